//! The admin API's refusals (SPEC §4): every bad body answered with the
//! right status, `error.code` and a message naming the field, the state
//! untouched; `If-Match`; bearer tokens and the actor they name; the open
//! endpoints.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[rustfmt::skip] // the shared harness keeps its own layout
mod support;

use http::StatusCode;
use serde_json::{json, Value};
use support::*;

/// What must not move when a call is refused.
fn fingerprint(v: &Value) -> Value {
    json!({
        "generation": v["generation"],
        "weights": v["weights"],
        "live": v["live"],
        "blue": v["pools"]["blue"]["backends"].as_array().map(|b| b.iter().map(|x| x["addr"].clone()).collect::<Vec<_>>()),
        "green": v["pools"]["green"]["backends"].as_array().map(|b| b.iter().map(|x| x["addr"].clone()).collect::<Vec<_>>()),
    })
}

async fn history_len(admin: &Admin) -> usize {
    let (s, h) = admin.get("/api/v1/services/web/history").await;
    assert_eq!(s, StatusCode::OK, "{h}");
    h.as_array().unwrap().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bodies_are_refused_precisely_and_change_nothing() {
    let (blue, green) = (
        Upstream::start("blue").await,
        Upstream::start("green").await,
    );
    let proxy = TestProxy::start(&[Svc::new("web", &[&blue], &[&green])]).await;
    let admin = &proxy.admin;
    // A non-trivial state to compare against: a 10 % canary.
    admin
        .ok("/api/v1/services/web/split", r#"{"green":10}"#)
        .await;
    let before = fingerprint(&admin.service("web").await);
    let history_before = history_len(admin).await;

    let switch = "/api/v1/services/web/switch";
    let split = "/api/v1/services/web/split";
    let rollback = "/api/v1/services/web/rollback";
    let pool = "/api/v1/services/web/pools/green";
    // (method, path, body, status, error.code, words the message must contain)
    type Case<'a> = (&'a str, &'a str, &'a str, u16, &'a str, &'a [&'a str]);
    let cases: &[Case] = &[
        (
            "POST",
            switch,
            r#"{"to":"green","colour":"red"}"#,
            400,
            "unknown_field",
            &["colour"],
        ),
        (
            "POST",
            split,
            r#"{"green":10,"bogus":1}"#,
            400,
            "unknown_field",
            &["bogus"],
        ),
        (
            "POST",
            split,
            r#"{"green":150}"#,
            400,
            "invalid_field",
            &["green", "150"],
        ),
        (
            "POST",
            split,
            r#"{"green":-1}"#,
            400,
            "invalid_field",
            &["green"],
        ),
        (
            "POST",
            split,
            r#"{"green":10.005}"#,
            400,
            "invalid_field",
            &["green", "decimals"],
        ),
        (
            "POST",
            split,
            r#"{"green":"10"}"#,
            400,
            "invalid_field",
            &["green"],
        ),
        (
            "POST",
            split,
            r#"{"green":null}"#,
            400,
            "invalid_field",
            &["green"],
        ),
        (
            "POST",
            split,
            r#"{"green":10,"blue":80}"#,
            400,
            "invalid_field",
            &["blue", "100"],
        ),
        (
            "POST",
            split,
            r#"{}"#,
            400,
            "invalid_field",
            &["green", "missing"],
        ),
        (
            "POST",
            split,
            r#"{"green":20,"force":1}"#,
            400,
            "invalid_field",
            &["force"],
        ),
        (
            "POST",
            switch,
            r#"{"to":"purple"}"#,
            400,
            "invalid_field",
            &["to", "purple"],
        ),
        (
            "POST",
            switch,
            r#"{"to":"Green"}"#,
            400,
            "invalid_field",
            &["to", "Green"],
        ),
        ("POST", switch, r#"{"to":1}"#, 400, "invalid_field", &["to"]),
        (
            "POST",
            switch,
            r#"{"to":"green","force":"yes"}"#,
            400,
            "invalid_field",
            &["force"],
        ),
        (
            "POST",
            switch,
            r#"{"to":"green","reason":5}"#,
            400,
            "invalid_field",
            &["reason"],
        ),
        (
            "POST",
            switch,
            r#"{}"#,
            400,
            "invalid_field",
            &["to", "missing"],
        ),
        ("POST", switch, "", 400, "invalid_field", &["to", "missing"]),
        ("POST", switch, r#"{"to":"#, 400, "invalid_json", &["JSON"]),
        (
            "POST",
            switch,
            r#"{"to":"green"}}"#,
            400,
            "invalid_json",
            &["JSON"],
        ),
        (
            "POST",
            switch,
            r#"["green"]"#,
            400,
            "invalid_json",
            &["object"],
        ),
        ("POST", switch, "to=green", 400, "invalid_json", &["JSON"]),
        (
            "POST",
            rollback,
            r#"{"to_generation":"1"}"#,
            400,
            "invalid_field",
            &["to_generation"],
        ),
        (
            "POST",
            rollback,
            r#"{"to_generation":-1}"#,
            400,
            "invalid_field",
            &["to_generation"],
        ),
        (
            "POST",
            rollback,
            r#"{"to_generation":1.5}"#,
            400,
            "invalid_field",
            &["to_generation"],
        ),
        (
            "POST",
            rollback,
            r#"{"to":"blue"}"#,
            400,
            "unknown_field",
            &["to"],
        ),
        (
            "PUT",
            pool,
            r#"{"backends":"127.0.0.1:1"}"#,
            400,
            "invalid_field",
            &["backends"],
        ),
        (
            "PUT",
            pool,
            r#"{"backends":["127.0.0.1"]}"#,
            400,
            "invalid_field",
            &["backends", "[0]", "port"],
        ),
        (
            "PUT",
            pool,
            r#"{"backends":["127.0.0.1:1", 7]}"#,
            400,
            "invalid_field",
            &["backends", "[1]"],
        ),
        (
            "PUT",
            pool,
            r#"{"backends":["ftp://127.0.0.1:1"]}"#,
            400,
            "invalid_field",
            &["backends", "scheme"],
        ),
        (
            "PUT",
            pool,
            r#"{"backends":[]}"#,
            400,
            "invalid_field",
            &["backends", "empty"],
        ),
        (
            "PUT",
            pool,
            r#"{"backends":["127.0.0.1:1","127.0.0.1:1"]}"#,
            400,
            "invalid_field",
            &["backends", "twice"],
        ),
        (
            "PUT",
            pool,
            r#"{}"#,
            400,
            "invalid_field",
            &["backends", "missing"],
        ),
        (
            "PUT",
            pool,
            r#"{"backends":["127.0.0.1:1"],"color":"green"}"#,
            400,
            "unknown_field",
            &["color"],
        ),
        (
            "POST",
            "/api/v1/services/nope/switch",
            r#"{"to":"green"}"#,
            404,
            "unknown_service",
            &["nope"],
        ),
        (
            "PUT",
            "/api/v1/services/web/pools/red",
            r#"{"backends":["127.0.0.1:1"]}"#,
            404,
            "unknown_color",
            &["red"],
        ),
        (
            "GET",
            "/api/v1/services/nope",
            "",
            404,
            "unknown_service",
            &["nope"],
        ),
        (
            "GET",
            "/api/v1/services/nope/history",
            "",
            404,
            "unknown_service",
            &["nope"],
        ),
        (
            "GET",
            "/api/v1/nothing-here",
            "",
            404,
            "not_found",
            &["nothing-here"],
        ),
        ("GET", switch, "", 405, "method_not_allowed", &["POST"]),
        (
            "DELETE",
            "/api/v1/services/web",
            "",
            405,
            "method_not_allowed",
            &["GET"],
        ),
    ];
    for (method, path, body, status, code, words) in cases {
        let (s, v) = admin.call(method, path, Some(body), &[]).await;
        let what = format!("{method} {path} {body}");
        assert_eq!(s.as_u16(), *status, "{what}: {v}");
        assert_eq!(v["error"]["code"], *code, "{what}: {v}");
        let message = v["error"]["message"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: no message: {v}"));
        for w in *words {
            assert!(
                message.contains(w),
                "{what}: message {message:?} does not name {w:?}"
            );
        }
        assert_eq!(
            fingerprint(&admin.service("web").await),
            before,
            "{what} changed the state"
        );
    }
    assert_eq!(
        history_len(admin).await,
        history_before,
        "a refusal was recorded in history"
    );

    // A 405 says what is allowed.
    let resp = admin
        .client
        .request(
            http::Request::get(format!("{}{switch}", admin.base))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(resp.headers()["allow"], "POST");

    // A body that is fine still works, and returns the new service object.
    let v = admin.ok(split, r#"{"green":12.5,"blue":87.5}"#).await;
    assert_eq!(v["weights"], json!({"blue": 87.5, "green": 12.5}));
    assert_eq!(v["name"], "web");
    assert_eq!(v["generation"], before["generation"].as_u64().unwrap() + 1);
    // Repeating a change that is already in effect is accepted and changes nothing.
    let again = admin.ok(split, r#"{"green":12.5}"#).await;
    assert_eq!(again["generation"], v["generation"]);
    assert_eq!(history_len(admin).await, history_before + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_if_match_is_refused_with_412() {
    let (blue, green) = (
        Upstream::start("blue").await,
        Upstream::start("green").await,
    );
    let proxy = TestProxy::start(&[Svc::new("web", &[&blue], &[&green])]).await;
    let admin = &proxy.admin;
    let switch = "/api/v1/services/web/switch";

    // Two pipelines both read generation 1; the first one wins.
    let (s, v) = admin
        .call(
            "POST",
            switch,
            Some(r#"{"to":"green"}"#),
            &[("if-match", "\"1\"")],
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["generation"], 2);
    let before = fingerprint(&admin.service("web").await);
    let (s, v) = admin
        .call(
            "POST",
            "/api/v1/services/web/split",
            Some(r#"{"green":50}"#),
            &[("if-match", "\"1\"")],
        )
        .await;
    assert_eq!(s, StatusCode::PRECONDITION_FAILED, "{v}");
    assert_eq!(v["error"]["code"], "stale_generation");
    assert!(v["error"]["message"].as_str().unwrap().contains('2'), "{v}");
    assert_eq!(fingerprint(&admin.service("web").await), before);
    let (s, _) = admin
        .call(
            "PUT",
            "/api/v1/services/web/pools/blue",
            Some(&json!({"backends": [blue.addr.to_string()]}).to_string()),
            &[("if-match", "\"1\"")],
        )
        .await;
    assert_eq!(s, StatusCode::PRECONDITION_FAILED);
    let (s, _) = admin
        .call(
            "POST",
            "/api/v1/services/web/rollback",
            Some("{}"),
            &[("if-match", "7")],
        )
        .await;
    assert_eq!(s, StatusCode::PRECONDITION_FAILED);
    assert_eq!(fingerprint(&admin.service("web").await), before);
    assert_eq!(
        proxy.get("/").await.2,
        "green",
        "traffic still follows the winner"
    );

    // A current one goes through; so does `*` (no condition).
    let (s, v) = admin
        .call(
            "POST",
            switch,
            Some(r#"{"to":"blue"}"#),
            &[("if-match", "\"2\"")],
        )
        .await;
    assert_eq!(
        (s, v["generation"].as_u64()),
        (StatusCode::OK, Some(3)),
        "{v}"
    );
    let (s, v) = admin
        .call(
            "POST",
            switch,
            Some(r#"{"to":"green"}"#),
            &[("if-match", "*")],
        )
        .await;
    assert_eq!(
        (s, v["generation"].as_u64()),
        (StatusCode::OK, Some(4)),
        "{v}"
    );
    // A malformed one is a bad request, not a silent pass.
    let (s, v) = admin
        .call(
            "POST",
            switch,
            Some(r#"{"to":"blue"}"#),
            &[("if-match", "\"four\"")],
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("If-Match"),
        "{v}"
    );
    assert_eq!(admin.service("web").await["generation"], 4);

    // Eight pipelines race with the same, current generation: exactly one wins.
    let mut racers = Vec::new();
    for i in 0..8 {
        let admin = Admin::new(proxy.running.as_ref().unwrap().admin_addr);
        racers.push(tokio::spawn(async move {
            let body = json!({ "green": 10 + i }).to_string();
            admin
                .call(
                    "POST",
                    "/api/v1/services/web/split",
                    Some(&body),
                    &[("if-match", "\"4\"")],
                )
                .await
        }));
    }
    let mut won = Vec::new();
    for r in racers {
        let (s, v) = r.await.unwrap();
        match s {
            StatusCode::OK => won.push(v),
            StatusCode::PRECONDITION_FAILED => assert_eq!(v["error"]["code"], "stale_generation"),
            other => panic!("{other}: {v}"),
        }
    }
    assert_eq!(won.len(), 1, "{won:?}");
    let now = admin.service("web").await;
    assert_eq!(
        (now["generation"].as_u64(), &now["weights"]),
        (Some(5), &won[0]["weights"])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_file_guards_the_api_and_names_the_actor() {
    let (blue, green) = (
        Upstream::start("blue").await,
        Upstream::start("green").await,
    );
    let (proxy, _) = TestProxy::start_with_tokens(
        "# pipelines\nci:ci-secret-123\n\nbare-secret-456\n",
        &[Svc::new("web", &[&blue], &[&green])],
    )
    .await;
    let open = Admin::new(proxy.running.as_ref().unwrap().admin_addr);
    let with = |t: &str| {
        let mut a = Admin::new(proxy.running.as_ref().unwrap().admin_addr);
        a.token = Some(t.to_string());
        a
    };
    let (ci, bare, wrong) = (
        with("ci-secret-123"),
        with("bare-secret-456"),
        with("ci-secret-12"),
    );

    // No token, a wrong token, a non-bearer scheme: 401 on every API path.
    for path in [
        "/api/v1/services",
        "/api/v1/services/web",
        "/api/v1/services/web/history",
        "/api/v1/services/nope",
    ] {
        for (who, admin) in [("none", &open), ("wrong", &wrong)] {
            let (s, v) = admin.get(path).await;
            assert_eq!(s, StatusCode::UNAUTHORIZED, "{who} token, GET {path}: {v}");
            assert_eq!(v["error"]["code"], "unauthorized");
        }
    }
    let (s, _) = open
        .call(
            "GET",
            "/api/v1/services",
            None,
            &[("authorization", "Basic Y2k6Y2ktc2VjcmV0LTEyMw==")],
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _) = open
        .call(
            "GET",
            "/api/v1/services",
            None,
            &[("authorization", "ci-secret-123")],
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // Mutations without a valid token change nothing.
    let before = fingerprint(&ci.service("web").await);
    for admin in [&open, &wrong] {
        let (s, _) = admin
            .post("/api/v1/services/web/switch", r#"{"to":"green"}"#)
            .await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        let (s, _) = admin
            .put(
                "/api/v1/services/web/pools/green",
                &json!({"backends": [blue.addr.to_string()]}).to_string(),
            )
            .await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        let (s, _) = admin.post("/api/v1/reload", "").await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(fingerprint(&ci.service("web").await), before);
    assert_eq!(proxy.get("/").await.2, "blue");

    // Valid tokens work, and history names them.
    let (s, v) = ci.get("/api/v1/services").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v[0]["name"], "web");
    let v = ci
        .ok(
            "/api/v1/services/web/switch",
            r#"{"to":"green","reason":"ship it"}"#,
        )
        .await;
    assert_eq!(v["live"], "green");
    assert_eq!(proxy.get("/").await.2, "green");
    bare.ok("/api/v1/services/web/rollback", "{}").await;
    let (_, h) = ci.get("/api/v1/services/web/history").await;
    assert_eq!(
        (h[0]["action"].as_str(), h[0]["actor"].as_str()),
        (Some("rollback"), Some("admin")),
        "{h}"
    );
    assert_eq!(
        (h[1]["action"].as_str(), h[1]["actor"].as_str()),
        (Some("switch"), Some("ci")),
        "{h}"
    );
    assert_eq!(h[1]["reason"], "ship it");

    // Liveness, readiness and metrics stay open.
    for path in ["/healthz", "/readyz", "/metrics"] {
        let (s, v) = open.get(path).await;
        assert_eq!(s, StatusCode::OK, "{path}: {v}");
    }
    assert!(open.metrics().await.contains("switchyard_pool_weight"));
}

/// Issue 17 item 10: the `Bearer` scheme is case-insensitive (RFC 9110
/// §11.1), so `bearer …` and `BEARER …` authenticate; the secret is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_scheme_is_case_insensitive() {
    let (blue, green) = (
        Upstream::start("blue").await,
        Upstream::start("green").await,
    );
    let (proxy, _) = TestProxy::start_with_tokens(
        "ci:ci-secret-123\n",
        &[Svc::new("web", &[&blue], &[&green])],
    )
    .await;
    let open = Admin::new(proxy.running.as_ref().unwrap().admin_addr);
    for scheme in ["bearer", "BEARER", "BeArEr"] {
        let value = format!("{scheme} ci-secret-123");
        let (s, v) = open
            .call(
                "GET",
                "/api/v1/services",
                None,
                &[("authorization", &value)],
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{value}: {v}");
        assert_eq!(v[0]["name"], "web");
    }
    // A mutation with a lower-case scheme is applied and names the token.
    let (s, v) = open
        .call(
            "POST",
            "/api/v1/services/web/switch",
            Some(r#"{"to":"green"}"#),
            &[("authorization", "bearer ci-secret-123")],
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(proxy.get("/").await.2, "green");
    let (_, h) = open
        .call(
            "GET",
            "/api/v1/services/web/history",
            None,
            &[("authorization", "bearer ci-secret-123")],
        )
        .await;
    assert_eq!(h[0]["actor"], "ci", "{h}");
    // The secret itself stays case-sensitive.
    let (s, _) = open
        .call(
            "GET",
            "/api/v1/services",
            None,
            &[("authorization", "bearer CI-SECRET-123")],
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
}
