//! The operator page (SPEC §12, §13) in a real headless Chromium, driven
//! through Debian's chromedriver with fantoccini (W3C WebDriver; nothing is
//! downloaded). Without chromium/chromedriver the test says it skipped and
//! passes, unless `SWITCHYARD_REQUIRE_ALL_TESTS=1` (set by `.ci/run`).
//!
//! One browser session walks through the scenarios in order (a Chromium per
//! scenario would be too heavy for a 2-core CI machine); each step asserts
//! through the admin API, the source of truth, not only on the page.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use http::StatusCode;
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{json, Value};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CHROMIUM: &str = "/usr/bin/chromium";

/// chromedriver and chromium, or `None` (the test then skips).
fn browser() -> Option<(PathBuf, Option<PathBuf>)> {
    let driver = std::env::var_os("CHROMEDRIVER")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("PATH").and_then(|p| {
                std::env::split_paths(&p)
                    .map(|d| d.join("chromedriver"))
                    .find(|f| f.is_file())
            })
        })?;
    let chromium = Path::new(CHROMIUM)
        .is_file()
        .then(|| PathBuf::from(CHROMIUM));
    Some((driver, chromium))
}

/// Kills the chromedriver this test started (by its own handle).
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn session(port: u16, chromium: &Option<PathBuf>, extra: &[&str]) -> Client {
    let mut args = vec![
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,800",
        "--no-first-run",
        "--disable-extensions",
    ];
    args.extend_from_slice(extra);
    let mut opts = json!({ "args": args });
    if let Some(c) = chromium {
        opts["binary"] = json!(c);
    }
    let caps = json!({ "goog:chromeOptions": opts });
    let caps = caps.as_object().unwrap().clone();
    let url = format!("http://127.0.0.1:{port}");
    // chromedriver listens a moment after it starts: retry, bounded.
    let mut last = String::new();
    for _ in 0..150 {
        match ClientBuilder::new(HttpConnector::new())
            .capabilities(caps.clone())
            .connect(&url)
            .await
        {
            Ok(c) => return c,
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no WebDriver session from chromedriver on {url}: {last}");
}

async fn find(c: &Client, css: &str) -> Element {
    c.wait()
        .at_most(Duration::from_secs(20))
        .for_element(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("no element `{css}` on the page: {e}"))
}

async fn js(c: &Client, script: &str) -> Value {
    c.execute(script, vec![]).await.unwrap()
}

/// Waits (bounded) until `script` returns true in the page.
async fn until(c: &Client, script: &str, what: &str) {
    for _ in 0..200 {
        if js(c, script).await == Value::Bool(true) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the page never showed: {what} ({script})");
}

async fn confirm_with_reason(c: &Client, reason: &str) {
    let r = find(c, "dialog#confirm[open] textarea[name=reason]").await;
    r.send_keys(reason).await.unwrap();
    find(c, "dialog#confirm[open] button[value=confirm]")
        .await
        .click()
        .await
        .unwrap();
}

async fn screenshot(c: &Client, name: &str) {
    let png = c.screenshot().await.unwrap();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), png).unwrap();
}

/// A page on another origin whose script tries to switch `web` through the
/// admin API with a no-cors POST (no preflight), then sets its title.
async fn attacker_site(admin: &str) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let page = format!(
        "<!doctype html><title>attacker</title><script>\
         fetch('{admin}/api/v1/services/web/switch', {{method: 'POST', mode: 'no-cors', \
           headers: {{'Content-Type': 'text/plain'}}, body: '{{\"to\":\"green\",\"reason\":\"csrf\"}}'}})\
           .then(() => {{ document.title = 'sent'; }}, () => {{ document.title = 'sent'; }});\
         </script>"
    );
    tokio::spawn(async move {
        // Serves a handful of requests, then stops.
        for _ in 0..8 {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            let resp = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{page}",
                page.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_page_in_a_real_browser() {
    let Some((driver, chromium)) = browser() else {
        assert!(
            std::env::var("SWITCHYARD_REQUIRE_ALL_TESTS").as_deref() != Ok("1"),
            "SWITCHYARD_REQUIRE_ALL_TESTS=1 but chromedriver is missing \
             (apt-get install chromium chromium-driver)"
        );
        eprintln!("SKIPPED webui: no chromedriver (apt-get install chromium chromium-driver)");
        return;
    };
    let port = free_port();
    let _driver = KillOnDrop(
        Command::new(&driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );

    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let proxy = TestProxy::start(&[Svc::new("web", &[&blue], &[&green])]).await;
    let admin = &proxy.admin;
    let c = session(port, &chromium, &[]).await;

    // 1. The page shows the service, its pools, weights, backends, health.
    c.goto(&format!("{}/", admin.base)).await.unwrap();
    let card = find(&c, r#"[data-service="web"][data-live="blue"]"#).await;
    let text = card.text().await.unwrap();
    for want in ["BLUE", "GREEN", "generation 1", "1/1 healthy", "no rollout"] {
        assert!(text.contains(want), "page lacks {want:?}:\n{text}");
    }
    assert!(text.contains(&blue.addr.to_string()), "{text}");
    assert!(
        js(
            &c,
            "return matchMedia('(prefers-color-scheme: dark)').matches"
        )
        .await
            == json!(false)
    );

    // 2. Live rates per pool follow the traffic.
    for _ in 0..30 {
        assert_eq!(proxy.get("/").await.0, StatusCode::OK);
    }
    until(
        &c,
        r#"return Number(document.querySelector('[data-service="web"] [data-pool="blue"] [data-rate="rps_10s"]').textContent) > 0"#,
        "a blue req/s above 0",
    )
    .await;
    until(
        &c,
        r#"return document.querySelector('[data-service="web"] [data-pool="blue"] [data-rate="error_ratio_10s"]').textContent === '0.00 %'"#,
        "a blue 5xx ratio of 0.00 %",
    )
    .await;

    // 3. Switch to green from the page, with a reason; the API agrees.
    find(
        &c,
        r#"[data-service="web"] button[data-action="switch"][data-to="green"]"#,
    )
    .await
    .click()
    .await
    .unwrap();
    let change = find(&c, "dialog#confirm[open] #confirm-change").await;
    let change = change.text().await.unwrap();
    assert!(change.contains("GREEN 100 %"), "{change}");
    confirm_with_reason(&c, "webui test: green verified").await;
    find(&c, r#"[data-service="web"][data-live="green"]"#).await;
    let svc = admin.service("web").await;
    assert_eq!(svc["live"], "green");
    let (_, h) = admin.get("/api/v1/services/web/history").await;
    assert_eq!(h[0]["reason"], "webui test: green verified", "{h}");
    assert_eq!(h[0]["action"], "switch");
    until(
        &c,
        r#"return [...document.querySelectorAll('[data-service="web"] .history td.reason')].some(td => td.textContent === 'webui test: green verified')"#,
        "the reason in the history table",
    )
    .await;
    screenshot(&c, "webui-light.png").await;

    // 4. Split with the keyboard on the slider, then the number box.
    let range = find(&c, r#"[data-service="web"] input[data-split="range"]"#).await;
    range.send_keys("\u{E012}").await.unwrap(); // ArrowLeft: 100 → 99.99
    until(
        &c,
        r#"return document.querySelector('[data-service="web"] input[data-split="number"]').value === '99.99'"#,
        "the number box following the slider (0.01 step)",
    )
    .await;
    let num = find(&c, r#"[data-service="web"] input[data-split="number"]"#).await;
    num.clear().await.unwrap();
    num.send_keys("12.34").await.unwrap();
    find(&c, r#"[data-service="web"] button[data-action="split"]"#)
        .await
        .click()
        .await
        .unwrap();
    confirm_with_reason(&c, "canary 12.34").await;
    find(&c, r#"[data-service="web"][data-live="split"]"#).await;
    let svc = admin.service("web").await;
    assert_eq!(svc["weights"]["green"], 12.34, "{svc}");
    assert_eq!(svc["weights"]["blue"], 87.66, "{svc}");

    // 5. A stale page: someone else acts while the dialog is open. The
    //    page's change is refused (412), explained, and the page refreshes.
    //    Driven from the keyboard: focus the button, press Enter.
    js(&c, r#"document.querySelector('[data-service="web"] button[data-action="rollback"]').focus(); return true"#).await;
    c.active_element()
        .await
        .unwrap()
        .send_keys("\u{E007}")
        .await
        .unwrap();
    find(&c, "dialog#confirm[open]").await;
    let gen_before = admin.service("web").await["generation"].clone();
    admin
        .call(
            "POST",
            "/api/v1/services/web/switch",
            Some(r#"{"to":"blue","reason":"pipeline got there first"}"#),
            &[],
        )
        .await;
    confirm_with_reason(&c, "should not apply").await;
    let notice = find(&c, "#notice:not([hidden])").await;
    until(
        &c,
        "return document.querySelector('#notice').textContent.includes('changed since')",
        "the 412 explained",
    )
    .await;
    let notice = notice.text().await.unwrap();
    assert!(notice.contains("pipeline got there first"), "{notice}");
    find(&c, r#"[data-service="web"][data-live="blue"]"#).await;
    let svc = admin.service("web").await;
    assert_eq!(svc["live"], "blue", "the stale rollback must not apply");
    assert_eq!(svc["generation"], gen_before.as_u64().unwrap() + 1);

    // 6. A reason with markup is shown as text and runs nothing.
    let xss = r#"<img src=x onerror="window.__xss=1;document.title='pwned'">"#;
    let body = json!({ "green": 5, "reason": xss }).to_string();
    admin.ok("/api/v1/services/web/split", &body).await;
    until(
        &c,
        &format!(
            "return [...document.querySelectorAll('.history td.reason')].some(td => td.textContent === {})",
            json!(xss)
        ),
        "the markup reason as literal text",
    )
    .await;
    assert_eq!(
        js(&c, "return document.querySelectorAll('main img').length").await,
        json!(0)
    );
    assert_eq!(
        js(&c, "return typeof window.__xss").await,
        json!("undefined")
    );
    assert_ne!(c.title().await.unwrap(), "pwned");

    // 7. A page on another origin cannot switch traffic (no-cors POST).
    admin
        .ok("/api/v1/services/web/switch", r#"{"to":"blue"}"#)
        .await;
    let generation = admin.service("web").await["generation"].clone();
    let evil = attacker_site(&admin.base).await;
    c.goto(&format!("http://{evil}/")).await.unwrap();
    until(
        &c,
        "return document.title === 'sent'",
        "the attacker's request sent",
    )
    .await;
    let svc = admin.service("web").await;
    assert_eq!(svc["live"], "blue");
    assert_eq!(
        svc["generation"], generation,
        "a cross-origin POST changed the state"
    );

    // 8. Phone width and 1280×800: nothing wider than the window.
    c.goto(&format!("{}/ui/", admin.base)).await.unwrap();
    find(&c, r#"[data-service="web"]"#).await;
    for (w, h) in [(390, 844), (1280, 800)] {
        c.set_window_size(w, h).await.unwrap();
        let fits = "return document.documentElement.scrollWidth <= window.innerWidth";
        let mut ok = false;
        for _ in 0..50 {
            if js(&c, fits).await == Value::Bool(true) {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if !ok {
            // Name what sticks out, so a failure says what to fix.
            let wide = js(
                &c,
                "const w = window.innerWidth; return [document.documentElement.scrollWidth, w, \
                 [...document.querySelectorAll('body *')].filter(e => e.getBoundingClientRect().right > w + 1) \
                 .slice(0, 8).map(e => e.tagName + '.' + e.className + '#' + e.id + ':' + Math.round(e.getBoundingClientRect().right))]",
            )
            .await;
            panic!("horizontal scrolling at {w}x{h}: [scrollWidth, innerWidth, elements past the edge] = {wide}");
        }
    }

    // 9. With a token file, the page asks for a token; a wrong one is
    //    explained; the right one shows the services.
    let (tproxy, _) = TestProxy::start_with_tokens(
        "alice:correct-horse-1\n",
        &[Svc::new("web", &[&blue], &[&green])],
    )
    .await;
    c.goto(&format!("{}/ui/", tproxy.admin.base)).await.unwrap();
    let input = find(&c, "dialog#token[open] input[type=password]").await;
    input.send_keys("wrong-token-123").await.unwrap();
    find(&c, "dialog#token[open] #token-ok")
        .await
        .click()
        .await
        .unwrap();
    until(
        &c,
        "return document.querySelector('dialog#token').open && document.querySelector('#token-error').textContent.includes('refused')",
        "the wrong token explained",
    )
    .await;
    let input = find(&c, "dialog#token[open] input[type=password]").await;
    input.send_keys("correct-horse-1\u{E007}").await.unwrap();
    find(&c, r#"[data-service="web"][data-live="blue"]"#).await;
    let stored = js(
        &c,
        "return document.cookie + '|' + localStorage.length + '|' + sessionStorage.length",
    )
    .await;
    assert_eq!(stored, json!("|0|0"), "the token must stay in memory only");
    c.close().await.unwrap();

    // 10. Dark mode screenshot, from a browser that prefers dark.
    let c = session(
        port,
        &chromium,
        &[
            "--force-dark-mode",
            "--blink-settings=preferredColorScheme=0",
        ],
    )
    .await;
    c.goto(&format!("{}/ui/", admin.base)).await.unwrap();
    find(&c, r#"[data-service="web"][data-live="blue"]"#).await;
    until(
        &c,
        "return document.querySelectorAll('.history tbody tr').length > 2",
        "history rows",
    )
    .await;
    until(
        &c,
        "return document.querySelector('#conn').dataset.conn === 'streaming'",
        "streaming",
    )
    .await;
    assert_eq!(
        js(
            &c,
            "return matchMedia('(prefers-color-scheme: dark)').matches"
        )
        .await,
        json!(true),
        "the dark screenshot must really be dark"
    );
    screenshot(&c, "webui-dark.png").await;
    c.close().await.unwrap();
}
