//! The operator page's server side over plain HTTP: SPEC §13 (cross-origin
//! mutations and DNS-rebinding hosts refused, curl-like clients unaffected),
//! the page's assets and headers, `/api/v1/stats` and `/api/v1/events`.

mod support;

use std::time::Duration;

use http::{Request, StatusCode};
use http_body_util::BodyExt;
use support::*;

const SWITCH: &str = "/api/v1/services/web/switch";

async fn web() -> (Upstream, Upstream, TestProxy) {
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let proxy = TestProxy::start(&[Svc::new("web", &[&blue], &[&green])]).await;
    (blue, green, proxy)
}

#[tokio::test]
async fn cross_origin_mutations_are_refused_and_state_is_unchanged() {
    let (_b, _g, proxy) = web().await;
    let admin = &proxy.admin;
    let own = admin.base.clone();
    let body = Some(r#"{"to":"green"}"#);
    for headers in [
        vec![("origin", "http://127.0.0.1:1")],
        vec![("origin", "null")],
        vec![("origin", "http://evil.example")],
        vec![("sec-fetch-site", "cross-site")],
        vec![("sec-fetch-site", "same-site"), ("origin", own.as_str())],
    ] {
        let (s, v) = admin.call("POST", SWITCH, body, &headers).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{headers:?}: {v}");
        assert_eq!(v["error"]["code"], "cross_origin", "{headers:?}: {v}");
        assert_eq!(admin.service("web").await["live"], "blue", "{headers:?}");
    }
    // Reads from another origin are not mutations (CORS keeps their
    // answers from the page: no Access-Control-Allow-Origin is sent).
    let (s, _) = admin
        .call(
            "GET",
            "/api/v1/services",
            None,
            &[("origin", "http://evil.example")],
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    // The page itself (same origin) and curl-like clients switch.
    let (s, v) = admin
        .call(
            "POST",
            SWITCH,
            body,
            &[("origin", own.as_str()), ("sec-fetch-site", "same-origin")],
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["live"], "green");
    let v = admin.ok("/api/v1/services/web/rollback", "{}").await;
    assert_eq!(v["live"], "blue");
}

#[tokio::test]
async fn a_foreign_host_is_refused_without_a_token_file_and_allowed_when_listed() {
    let (_b, _g, proxy) = web().await;
    let admin = &proxy.admin;
    for path in ["/api/v1/services", "/ui/", "/metrics"] {
        let (s, v) = admin
            .call(
                "GET",
                path,
                None,
                &[("host", "rebind.attacker.example:9901")],
            )
            .await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{path}: {v}");
        assert_eq!(v["error"]["code"], "forbidden_host", "{path}");
    }
    let (s, v) = admin
        .call(
            "POST",
            SWITCH,
            Some(r#"{"to":"green"}"#),
            &[("host", "rebind.attacker.example")],
        )
        .await;
    assert_eq!(
        (s, &v["error"]["code"]),
        (StatusCode::FORBIDDEN, &"forbidden_host".into())
    );
    assert_eq!(admin.service("web").await["live"], "blue");
    for host in ["localhost:9901", "127.0.0.1", "[::1]:9901"] {
        let (s, v) = admin
            .call("GET", "/api/v1/services", None, &[("host", host)])
            .await;
        assert_eq!(s, StatusCode::OK, "{host}: {v}");
    }

    // [admin] allowed_hosts.
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let dir = TempDir::new("allowed-hosts");
    let text = config_text(dir.path(), "", &[Svc::new("web", &[&blue], &[&green])]).replacen(
        "[admin]\nlisten = \"127.0.0.1:0\"\n",
        "[admin]\nlisten = \"127.0.0.1:0\"\nallowed_hosts = [\"switchyard.internal\"]\n",
        1,
    );
    let listed = TestProxy::start_text(dir, &text).await;
    let (s, v) = listed
        .admin
        .call(
            "GET",
            "/api/v1/services",
            None,
            &[("host", "switchyard.internal:9901")],
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, _) = listed
        .admin
        .call(
            "GET",
            "/api/v1/services",
            None,
            &[("host", "other.internal:9901")],
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn with_a_token_file_any_host_is_served_but_origins_are_still_checked() {
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let (mut proxy, _) = TestProxy::start_with_tokens(
        "alice:secret-alice-1\n",
        &[Svc::new("web", &[&blue], &[&green])],
    )
    .await;
    proxy.admin.token = Some("secret-alice-1".into());
    let (s, v) = proxy
        .admin
        .call(
            "GET",
            "/api/v1/services",
            None,
            &[("host", "switchyard.example.com")],
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = proxy
        .admin
        .call(
            "POST",
            SWITCH,
            Some(r#"{"to":"green"}"#),
            &[("origin", "http://evil.example")],
        )
        .await;
    assert_eq!(
        (s, &v["error"]["code"]),
        (StatusCode::FORBIDDEN, &"cross_origin".into())
    );
    // stats and events need the token like the rest of /api/v1.
    proxy.admin.token = None;
    for path in ["/api/v1/stats", "/api/v1/events"] {
        let (s, _) = proxy.admin.get(path).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{path}");
    }
    // The page itself needs no token: it carries no data.
    let (s, _) = proxy.admin.get("/ui/").await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn the_page_is_served_with_a_strict_policy_and_revalidated_by_etag() {
    let (_b, _g, proxy) = web().await;
    let client = http1_client();
    let get = |path: &str, inm: Option<String>| {
        let mut req = Request::get(format!("{}{path}", proxy.admin.base));
        if let Some(t) = inm {
            req = req.header("if-none-match", t);
        }
        client.request(req.body(empty()).unwrap())
    };
    let resp = get("/", None).await.unwrap();
    assert_eq!(resp.status(), StatusCode::FOUND);
    assert_eq!(resp.headers()["location"], "/ui/");
    for (path, ty) in [
        ("/ui/", "text/html"),
        ("/ui/app.js", "text/javascript"),
        ("/ui/app.css", "text/css"),
    ] {
        let resp = get(path, None).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
        let h = resp.headers().clone();
        assert!(
            h["content-type"].to_str().unwrap().starts_with(ty),
            "{path}"
        );
        let csp = h["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("script-src 'self'"), "{csp}");
        assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
        assert!(!csp.contains("unsafe-inline"), "{csp}");
        assert_eq!(h["x-content-type-options"], "nosniff");
        assert_eq!(h["cache-control"], "no-cache");
        let etag = h["etag"].to_str().unwrap().to_string();
        let again = get(path, Some(etag)).await.unwrap();
        assert_eq!(again.status(), StatusCode::NOT_MODIFIED, "{path}");
    }
    // API answers carry the same protections and are never cached.
    let resp = get("/api/v1/services", None).await.unwrap();
    assert_eq!(resp.headers()["x-content-type-options"], "nosniff");
    assert_eq!(resp.headers()["cache-control"], "no-store");
    assert!(resp.headers().contains_key("content-security-policy"));
}

#[tokio::test]
async fn stats_count_requests_and_5xx_per_pool() {
    let (_b, green, proxy) = web().await;
    let (s, v) = proxy.admin.get("/api/v1/stats").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["services"][0]["name"], "web");
    assert!(
        v["services"][0]["pools"]["green"]["error_ratio_10s"].is_null(),
        "{v}"
    );
    for _ in 0..20 {
        assert_eq!(proxy.get("/").await.0, StatusCode::OK);
    }
    green.set_failing(true);
    proxy.admin.ok(SWITCH, r#"{"to":"green"}"#).await;
    for _ in 0..20 {
        proxy.get("/").await;
    }
    // The sampler runs once a second; wait for a sample with both.
    let mut last = serde_json::Value::Null;
    let mut seen = false;
    for _ in 0..100 {
        let (_, v) = proxy.admin.get("/api/v1/stats").await;
        let web = &v["services"][0];
        seen = web["pools"]["blue"]["rps_10s"].as_f64().unwrap_or(0.0) > 0.0
            && web["pools"]["green"]["error_ratio_10s"].as_f64() == Some(1.0)
            && web["pools"]["blue"]["error_ratio_10s"].as_f64() == Some(0.0)
            && web["live"] == "green";
        last = v;
        if seen {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(seen, "stats never showed the traffic: {last}");
    assert_eq!(last["services"][0]["pools"]["blue"]["healthy"], 1);
    assert!(last["replica"].as_str().unwrap().starts_with("127.0.0.1:"));
}

/// Reads SSE frames from `body` until one satisfies `want`.
async fn next_event(
    body: &mut hyper::body::Incoming,
    buf: &mut String,
    want: impl Fn(&str, &serde_json::Value) -> bool,
) -> Option<(String, serde_json::Value)> {
    loop {
        while let Some(i) = buf.find("\n\n") {
            let block: String = buf.drain(..i + 2).collect();
            let mut event = String::new();
            let mut data = String::new();
            for line in block.lines() {
                if let Some(e) = line.strip_prefix("event: ") {
                    event = e.to_string();
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data.push_str(d);
                }
            }
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&data) {
                if want(&event, &v) {
                    return Some((event, v));
                }
            }
        }
        let frame = tokio::time::timeout(Duration::from_secs(20), body.frame())
            .await
            .ok()??
            .ok()?;
        if let Ok(d) = frame.into_data() {
            buf.push_str(&String::from_utf8_lossy(&d));
        }
    }
}

#[tokio::test]
async fn events_stream_state_on_connect_and_on_every_change_then_stats() {
    let (_b, _g, proxy) = web().await;
    let client = http1_client();
    let resp = client
        .request(
            Request::get(format!("{}/api/v1/events", proxy.admin.base))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    assert_eq!(resp.headers()["x-accel-buffering"], "no");
    let mut body = resp.into_body();
    let mut buf = String::new();
    let (_, v) = next_event(&mut body, &mut buf, |e, _| e == "state")
        .await
        .expect("state");
    assert_eq!(v[0]["live"], "blue");
    assert!(buf.is_empty() || !buf.contains("event: state"));
    proxy
        .admin
        .ok(SWITCH, r#"{"to":"green","reason":"via events"}"#)
        .await;
    let (_, v) = next_event(&mut body, &mut buf, |e, v| {
        e == "state" && v[0]["live"] == "green"
    })
    .await
    .expect("a state event after the switch");
    assert_eq!(v[0]["generation"], 2);
    next_event(&mut body, &mut buf, |e, v| {
        e == "stats" && v["services"].is_array()
    })
    .await
    .expect("a stats event");
}
