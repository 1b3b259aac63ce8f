//! Property tests (proptest) of the code that reads untrusted input: the
//! config parser, admin API request decoding, the routing decision, the
//! HTTP/1 framing guard and the hop-by-hop header removal (h2c). Nothing
//! may panic; what is accepted must be sane.
//!
//! In the suite each property runs 64 cases; for a longer, bounded run:
//! `PROPTEST_CASES=20000 cargo test --release --test props` (see SECURITY.md).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue};
use proptest::prelude::*;
use switchyard::testing::backend::{Backend, Health};
use switchyard::testing::color::Color;
use switchyard::testing::config::{
    self, BackendAddr, Balance, HostPattern, PreviewConfig, StickyConfig,
};
use switchyard::testing::h1guard::{Finding, H1Guard};
use switchyard::testing::headers::remove_hop_by_hop;
use switchyard::testing::metrics::Metrics;
use switchyard::testing::routing::{
    choose_pool, pick_backend, Decision, Pool, RequestFacts, Route, Service, Settings, Snapshot,
};
use switchyard::testing::state::{Command, Weights};

fn cases() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ===== Config parser =====

const VALID: &str = r#"[proxy]
listen = "127.0.0.1:8080"
tls_listen = "127.0.0.1:8443"
header_read_timeout = "10s"
[[proxy.tls]]
cert = "c.pem"
key = "k.pem"
[admin]
listen = "127.0.0.1:9901"
[state]
path = "var/state.json"
[[service]]
name = "web"
hosts = ["*.example.com", "a.example.org"]
path_prefix = "/"
balance = "least_request"
[service.blue]
backends = ["127.0.0.1:9001", "https://b.example:443"]
[service.green]
backends = ["[::1]:9101"]
[service.health]
path = "/healthz"
interval = "2s"
[service.sticky]
key = "header:x-user"
[service.preview]
token = "s3cret"
"#;

/// Lines that might appear in a config, valid or not.
fn config_line() -> impl Strategy<Value = String> {
    let keys = prop::sample::select(vec![
        "listen",
        "tls_listen",
        "workers",
        "connect_timeout",
        "idle_timeout",
        "header_read_timeout",
        "max_request_header_bytes",
        "name",
        "hosts",
        "path_prefix",
        "initial",
        "balance",
        "backends",
        "upstream_ca",
        "token_file",
        "cookie",
        "key",
        "header",
        "token",
        "interval",
        "unhealthy_after",
    ]);
    let values = prop::sample::select(vec![
        "\"0.0.0.0:1\"",
        "\"[::1]:0\"",
        "\"2s\"",
        "\"0s\"",
        "\"9999999999999h\"",
        "-1",
        "0",
        "4096",
        "1e9",
        "true",
        "\"blue\"",
        "\"purple\"",
        "[]",
        "[\"*\"]",
        "[\"127.0.0.1:1\", 7]",
        "\"https://h:1\"",
        "\"header:\"",
        "{ a = 1 }",
        "\"\\u0000\"",
        "\"/a b\"",
        "[[1]]",
    ]);
    let tables = prop::sample::select(vec![
        "[proxy]",
        "[admin]",
        "[state]",
        "[[service]]",
        "[service.blue]",
        "[service.green]",
        "[service.health]",
        "[[proxy.tls]]",
        "[service.x]",
        "[",
        "]]",
    ]);
    prop_oneof![
        (keys, values).prop_map(|(k, v)| format!("{k} = {v}")),
        tables.prop_map(str::to_string),
        "[ -~]{0,40}",
    ]
}

#[test]
fn the_seed_config_is_valid() {
    if let Err(e) = config::parse(VALID) {
        panic!("{e:#?}");
    }
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn config_parse_never_panics_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        let _ = config::parse(&String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn config_parse_of_edited_files(
        edits in prop::collection::vec((0usize..40, prop::option::of(config_line())), 0..6),
    ) {
        let mut lines: Vec<String> = VALID.lines().map(str::to_string).collect();
        for (at, line) in edits {
            let at = at % (lines.len() + 1);
            match line {
                Some(l) => lines.insert(at, l),
                None if at < lines.len() => { lines.remove(at); }
                None => {}
            }
        }
        let text = lines.join("\n");
        match config::parse(&text) {
            Ok(c) => {
                prop_assert!(!c.services.is_empty());
                let mut names = std::collections::HashSet::new();
                for s in &c.services {
                    prop_assert!(!s.blue.is_empty() && !s.green.is_empty(), "{text}");
                    prop_assert!(names.insert(s.name.clone()), "duplicate {} in\n{text}", s.name);
                    prop_assert!(s.path_prefix.starts_with('/'));
                }
                prop_assert!(c.admin.listen.ip().is_loopback() || c.admin.token_file.is_some());
                prop_assert!(c.proxy.tls_listen.is_none() == c.proxy.tls.is_empty(), "{text}");
            }
            Err(errors) => {
                prop_assert!(!errors.is_empty());
                let n = text.lines().count().max(1);
                for e in &errors {
                    prop_assert!(e.line <= n + 1, "line {} of {n}: {}", e.line, e.message);
                    prop_assert!(!e.message.is_empty());
                }
            }
        }
    }
}

// ===== Admin API decoding =====

fn json_value() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "\"green\"",
        "\"blue\"",
        "\"GREEN\"",
        "\"purple\"",
        "\"\"",
        "0",
        "10",
        "12.5",
        "100",
        "100.01",
        "-1",
        "1e308",
        "-0",
        "0.001",
        "9007199254740993",
        "true",
        "false",
        "null",
        "[]",
        "{}",
        "[\"127.0.0.1:1\"]",
        "[\"127.0.0.1\"]",
        "[\"https://h:443\", \"h:1\"]",
        "[1]",
        "\"x\\u0000y\"",
        "[\"GET\", \"POST\"]",
        "[\"CONNECT\"]",
        "\"5s\"",
        "\"0s\"",
    ])
    .prop_map(str::to_string)
}

fn json_body() -> impl Strategy<Value = Vec<u8>> {
    let field = prop::sample::select(vec![
        "to",
        "force",
        "reason",
        "green",
        "blue",
        "to_generation",
        "backends",
        "rules",
        "percent",
        "methods",
        "max_body_bytes",
        "max_inflight",
        "timeout",
        "colour",
        "",
    ]);
    prop_oneof![
        prop::collection::vec((field, json_value()), 0..5).prop_map(|fields| {
            let inner: Vec<String> = fields.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
            format!("{{{}}}", inner.join(",")).into_bytes()
        }),
        prop::collection::vec(any::<u8>(), 0..200),
    ]
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn admin_decoding_never_panics_and_accepts_only_sane_commands(
        action in prop::sample::select(vec!["switch", "split", "rollback", "pools/blue", "pools/green", "rules", "mirror", "nope"]),
        body in json_body(),
    ) {
        match switchyard::testing::admin::decode_mutation(action, &body) {
            Ok((cmd, reason)) => {
                prop_assert!(reason.is_none() || body.windows(8).any(|w| w == b"\"reason\""));
                match cmd {
                    Command::Split { weights, .. } => {
                        let sum = weights.percent(Color::Blue) + weights.percent(Color::Green);
                        prop_assert!((sum - 100.0).abs() < 1e-9);
                    }
                    Command::SetPool { backends, .. } => {
                        for b in &backends {
                            prop_assert!(b.port > 0 && !b.host.is_empty());
                        }
                    }
                    Command::Rollback { to_generation } => prop_assert!(to_generation != Some(0)),
                    Command::Switch { .. } => prop_assert_eq!(action, "switch"),
                    // Only a list every rule of which passed the checks.
                    Command::SetRules { rules } => {
                        prop_assert_eq!(action, "rules");
                        for r in &rules {
                            prop_assert!(!r.conditions.is_empty());
                        }
                    }
                    // Only a mirror that passed its checks.
                    Command::SetMirror { mirror } => {
                        prop_assert_eq!(action, "mirror");
                        prop_assert!(mirror.is_some_and(|m| m.check().is_ok()));
                    }
                    // Internal commands (config reload, state from etcd,
                    // a rollout claimed from a dead replica) never come
                    // out of a request body.
                    Command::Reload { .. } | Command::Adopt { .. } | Command::ClaimRollout { .. } => {
                        prop_assert!(false, "decoded an internal command from {action}");
                    }
                }
            }
            Err((status, code, message)) => {
                prop_assert!(status.is_client_error(), "{status} {code}");
                prop_assert!(!message.is_empty());
            }
        }
    }
}

// ===== Routing =====

fn backend(m: &Metrics, port: u16, healthy: bool) -> Arc<Backend> {
    let addr = BackendAddr::parse(&format!("127.0.0.1:{port}")).unwrap();
    let g = m.backend_healthy("t", Color::Blue, &addr.to_string());
    let h = if healthy {
        Health::Healthy
    } else {
        Health::Unhealthy
    };
    Arc::new(Backend::new(addr, None, h, false, g))
}

fn route(m: &Metrics, name: &str, green_bp: u16, token: Option<&str>, healthy: [bool; 3]) -> Route {
    let svc = Service::new(
        name,
        Balance::RoundRobin,
        StickyConfig {
            cookie: "switchyard_bucket".into(),
            key: None,
        },
        PreviewConfig {
            header: HeaderName::from_static("x-switchyard-pool"),
            token: token.map(str::to_string),
        },
        [m.pool(name, Color::Blue), m.pool(name, Color::Green)],
    );
    Route {
        service: Arc::new(svc),
        weights: Weights::from_green_percent(f64::from(green_bp) / 100.0).unwrap(),
        generation: 1,
        pools: [
            Arc::new(Pool::new(vec![
                backend(m, 1, healthy[0]),
                backend(m, 2, healthy[1]),
            ])),
            Arc::new(Pool::new(vec![backend(m, 3, healthy[2])])),
        ],
        rules: Box::new([]),
        mirror: None,
    }
}

fn settings() -> Settings {
    Settings {
        connect_timeout: std::time::Duration::from_secs(1),
        request_timeout: std::time::Duration::from_secs(1),
        upstream_read_timeout: std::time::Duration::from_secs(60),
        max_response_headers: 500,
        add_pool_header: true,
        request_id: true,
        forwarded_headers: true,
        access_log: false,
        drain_timeout: std::time::Duration::from_secs(1),
    }
}

fn header_value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::sample::select(vec![
            "green",
            "blue",
            " green ",
            "green;token=s3cret",
            "green; token=s3cret",
            "green;token=nope",
            "blue;token=",
            "switchyard_bucket=42",
            "a=1; switchyard_bucket=9999",
            "switchyard_bucket=10000",
            "switchyard_bucket=-1",
            "switchyard_bucket=0042",
            "switchyard_bucket=",
            "=;=;",
        ])
        .prop_map(|s| s.as_bytes().to_vec()),
        prop::collection::vec(0x20u8..0x7f, 0..40),
        prop::collection::vec(
            any::<u8>().prop_filter("visible", |b| *b == b'\t' || *b >= 0x20 && *b != 0x7f),
            0..40
        ),
    ]
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn snapshot_find_never_panics_and_respects_host_patterns(
        host in "[a-zA-Z0-9.:\\[\\]*-]{0,30}",
        path in "/[ -~]{0,30}",
    ) {
        let m = Metrics::new();
        let snap = Snapshot::new(
            vec![
                (route(&m, "exact", 0, None, [true; 3]), vec![HostPattern::Exact("shop.example.com".into())], "/".into()),
                (route(&m, "wild", 0, None, [true; 3]), vec![HostPattern::Suffix(".example.com".into())], "/api".into()),
                (route(&m, "api", 0, None, [true; 3]), vec![HostPattern::Any], "/api".into()),
            ],
            settings(),
        );
        if let Some(r) = snap.find(&host, &path) {
            prop_assert!(path.starts_with("/api") || &*r.service.name == "exact");
            if &*r.service.name == "exact" {
                let h = host.to_ascii_lowercase();
                prop_assert!(h.starts_with("shop.example.com"), "{host}");
            }
        } else {
            prop_assert!(!path.starts_with("/api/") && !path.starts_with("/api?") && path != "/api");
        }
    }

    #[test]
    fn choose_pool_never_panics_and_preview_never_fails_over(
        green_bp in 0u16..=10_000,
        token in prop::option::of(Just("s3cret")),
        healthy in prop::array::uniform3(any::<bool>()),
        preview in prop::option::of(header_value()),
        cookies in prop::collection::vec(header_value(), 0..3),
    ) {
        let m = Metrics::new();
        let r = route(&m, "web", green_bp, token, healthy);
        let mut h = HeaderMap::new();
        if let Some(v) = preview.as_deref().and_then(|v| HeaderValue::from_bytes(v).ok()) {
            h.insert("x-switchyard-pool", v);
        }
        for c in &cookies {
            if let Ok(v) = HeaderValue::from_bytes(c) {
                h.append(http::header::COOKIE, v);
            }
        }
        let uri = http::Uri::from_static("/");
        let facts = RequestFacts::new(&h, &uri, std::net::IpAddr::from([127, 0, 0, 1]));
        let mut choice = choose_pool(&r, &facts);
        if let Some(b) = choice.bucket {
            prop_assert!(b < 10_000);
            if choice.decision != Decision::Preview {
                prop_assert_eq!(choice.color, r.weights.pick(b));
            }
        }
        if choice.decision == Decision::Preview {
            let v = h.get("x-switchyard-pool").and_then(|v| v.to_str().ok()).unwrap_or("");
            prop_assert!(v.trim_start().starts_with(choice.color.as_str()), "{v:?}");
            if token.is_some() {
                prop_assert!(v.contains("token=s3cret"), "{v:?}");
            }
        }
        prop_assert!(!choice.set_cookie || choice.decision == Decision::Weight);
        let before = choice;
        match pick_backend(&r, &mut choice, &[]).map(|p| p.backend) {
            Some(b) => {
                prop_assert!(b.is_available(switchyard::testing::backend::now_ms()));
                if before.decision == Decision::Preview {
                    prop_assert_eq!(choice.color, before.color);
                }
            }
            None => {
                let pool_ok = |c: Color| r.pool(c).has_available(switchyard::testing::backend::now_ms());
                prop_assert!(!pool_ok(before.color));
                prop_assert!(before.decision == Decision::Preview || !pool_ok(before.color.other()));
            }
        }
    }
}

// ===== HTTP/1 framing guard =====

fn request_piece() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n".to_vec()),
        Just(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc".to_vec()),
        Just(
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n".to_vec()
        ),
        Just(b"\r\n".to_vec()),
        Just(b"\n".to_vec()),
        Just(b"Content-Length: 2\r\n".to_vec()),
        Just(b"Transfer-Encoding: chunked\r\n".to_vec()),
        Just(b"zz\r\n".to_vec()),
        prop::collection::vec(any::<u8>(), 0..30),
    ]
}

proptest! {
    #![proptest_config(cases())]

    /// Whatever the bytes, the guard's findings do not depend on how the
    /// reads split them, and it changes at most one byte, to NUL.
    #[test]
    fn h1guard_is_independent_of_read_boundaries(
        pieces in prop::collection::vec(request_piece(), 1..8),
        cuts in prop::collection::vec(1usize..50, 1..20),
    ) {
        let input: Vec<u8> = pieces.concat();
        let whole = {
            let mut g = H1Guard::new();
            let mut buf = input.clone();
            (g.scan(&mut buf), buf)
        };
        let mut g = H1Guard::new();
        let mut buf = input.clone();
        let mut findings = Vec::new();
        let mut at = 0;
        let mut k = 0;
        while at < buf.len() {
            let end = (at + cuts[k % cuts.len()]).min(buf.len());
            let f = g.scan(&mut buf[at..end]);
            if f != Finding::Clean {
                findings.push(f);
            }
            at = end;
            k += 1;
        }
        let whole_findings: Vec<Finding> = [whole.0].into_iter().filter(|f| *f != Finding::Clean).collect();
        prop_assert_eq!(findings, whole_findings);
        prop_assert_eq!(&buf, &whole.1);
        let changed: Vec<usize> = (0..input.len()).filter(|&i| input[i] != buf[i]).collect();
        prop_assert!(changed.len() <= 1);
        for i in changed {
            prop_assert_eq!(buf[i], 0);
        }
    }
}

// ===== Upgrade / Connection: h2c never passes (SPEC §14) =====

/// `token` with the case of each letter flipped where `mask` has a 1 bit.
fn mixed_case(token: &str, mask: u64) -> String {
    token
        .chars()
        .enumerate()
        .map(|(i, c)| {
            if mask >> (i % 64) & 1 == 1 {
                if c.is_ascii_lowercase() {
                    c.to_ascii_uppercase()
                } else {
                    c.to_ascii_lowercase()
                }
            } else {
                c
            }
        })
        .collect()
}

/// A header value: a list of `tokens`, each in a random case, joined by
/// one of the separators a client might use (also empty list elements).
fn token_list(tokens: &'static [&'static str]) -> impl Strategy<Value = String> {
    prop::collection::vec(
        (
            prop::sample::select(tokens),
            any::<u64>(),
            prop::sample::select(&[",", ", ", " , ", ",,", ",\t"][..]),
        ),
        1..5,
    )
    .prop_map(|parts| {
        let mut s = String::new();
        for (i, (t, mask, sep)) in parts.iter().enumerate() {
            if i > 0 {
                s.push_str(sep);
            }
            s.push_str(&mixed_case(t, *mask));
        }
        s
    })
}

const CONNECTION_TOKENS: &[&str] = &["upgrade", "http2-settings", "keep-alive", "close", "x-a"];
const UPGRADE_TOKENS: &[&str] = &[
    "h2c",
    "h2",
    "http/2.0",
    "http/2",
    "h2c/1",
    "websocket",
    "foo/1",
    "http/1.1",
];

fn is_http2(token: &str) -> bool {
    let t = token.trim().to_ascii_lowercase();
    let name = t.split('/').next().unwrap_or("");
    name == "h2c" || name == "h2" || t.starts_with("http/2")
}

proptest! {
    #![proptest_config(cases())]

    /// Whatever the `Connection` and `Upgrade` headers (case, extra tokens,
    /// several lines, `Connection` naming them or not), no hop-by-hop
    /// header stays, `HTTP2-Settings` never does, the upgrade passed on
    /// names no HTTP/2 protocol, and a WebSocket upgrade asked for survives.
    #[test]
    fn h2c_never_passes_and_websocket_survives(
        connection in prop::collection::vec(token_list(CONNECTION_TOKENS), 0..3),
        upgrade in prop::collection::vec(token_list(UPGRADE_TOKENS), 0..3),
        settings in any::<bool>(),
    ) {
        let mut h = HeaderMap::new();
        for v in &connection {
            h.append("connection", HeaderValue::from_str(v).unwrap());
        }
        for v in &upgrade {
            h.append("upgrade", HeaderValue::from_str(v).unwrap());
        }
        if settings {
            h.insert("http2-settings", HeaderValue::from_static("AAMAAABkAAQAAP__"));
        }
        h.insert("x-kept", HeaderValue::from_static("1"));
        let passed = remove_hop_by_hop(&mut h);

        prop_assert_eq!(h.len(), 1, "{:?}", h);
        prop_assert!(h.contains_key("x-kept"));
        let asked = connection
            .iter()
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
        // What a correct proxy passes on: the first Upgrade line's
        // protocols other than HTTP/2, if the client asked to upgrade.
        let expected: Vec<String> = match (asked, upgrade.first()) {
            (true, Some(first)) => first
                .split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty() && !is_http2(t))
                .map(str::to_ascii_lowercase)
                .collect(),
            _ => Vec::new(),
        };
        match &passed {
            None => prop_assert!(expected.is_empty(), "expected {:?}", expected),
            Some(v) => {
                let got: Vec<String> = v
                    .to_str()
                    .unwrap()
                    .split(',')
                    .map(|t| t.trim().to_ascii_lowercase())
                    .filter(|t| !t.is_empty())
                    .collect();
                prop_assert!(got.iter().all(|t| !is_http2(t)), "{:?}", got);
                prop_assert_eq!(got, expected);
            }
        }
    }
}
