//! Fixtures shared by the micro-benchmarks: a routing snapshot shaped like
//! a small real deployment, and a browser-like request head.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};
use switchyard::testing::backend::{Backend, Health};
use switchyard::testing::color::Color;
use switchyard::testing::config::{BackendAddr, Balance, HostPattern, PreviewConfig, StickyConfig};
use switchyard::testing::metrics::Metrics;
use switchyard::testing::routing::{Pool, Route, Service, Settings, Snapshot};
use switchyard::testing::state::Weights;

fn backend(m: &Metrics, svc: &str, color: Color, port: u16) -> Arc<Backend> {
    let addr = BackendAddr::parse(&format!("127.0.0.1:{port}")).expect("addr");
    let g = m.backend_healthy(svc, color, &addr.to_string());
    Arc::new(Backend::new(addr, None, Health::Healthy, false, g))
}

/// A route for service `name` at `green_pct` % green, with `per_pool`
/// backends in each pool.
pub fn route(m: &Metrics, name: &str, green_pct: f64, per_pool: u16, balance: Balance) -> Route {
    let service = Arc::new(Service::new(
        name,
        balance,
        StickyConfig {
            cookie: "switchyard_bucket".into(),
            key: None,
        },
        PreviewConfig {
            header: HeaderName::from_static("x-switchyard-pool"),
            token: None,
        },
        [m.pool(name, Color::Blue), m.pool(name, Color::Green)],
    ));
    let pool = |color: Color, base: u16| {
        let b = (0..per_pool)
            .map(|i| backend(m, name, color, base + i))
            .collect();
        Arc::new(Pool::new(b))
    };
    Route {
        service,
        weights: Weights::from_green_percent(green_pct).expect("weights"),
        generation: 1,
        pools: [pool(Color::Blue, 10_000), pool(Color::Green, 20_000)],
        rules: Box::new([]),
        mirror: None,
    }
}

pub fn settings() -> Settings {
    Settings {
        connect_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(60),
        upstream_read_timeout: Duration::from_secs(60),
        max_response_headers: 500,
        add_pool_header: true,
        request_id: true,
        forwarded_headers: true,
        access_log: false,
        drain_timeout: Duration::from_secs(30),
    }
}

/// One service, every host, `/`: the common single-service edge.
pub fn single(m: &Metrics) -> Snapshot {
    Snapshot::new(
        vec![(
            route(m, "web", 10.0, 2, Balance::RoundRobin),
            vec![HostPattern::Any],
            "/".into(),
        )],
        settings(),
    )
}

/// Ten services: exact hosts, a wildcard, path prefixes and a catch-all;
/// the benchmarked request matches the wildcard's `/api` prefix, so the
/// match list is walked past the exact hosts.
pub fn ten(m: &Metrics) -> Snapshot {
    let mut routes = Vec::new();
    for i in 0..6 {
        routes.push((
            route(m, &format!("exact{i}"), 10.0, 2, Balance::RoundRobin),
            vec![HostPattern::Exact(format!("svc{i}.example.com"))],
            "/".into(),
        ));
    }
    routes.push((
        route(m, "api", 10.0, 4, Balance::LeastRequest),
        vec![HostPattern::Suffix(".example.org".into())],
        "/api".into(),
    ));
    routes.push((
        route(m, "static", 10.0, 2, Balance::RoundRobin),
        vec![HostPattern::Suffix(".example.org".into())],
        "/static/".into(),
    ));
    routes.push((
        route(m, "wild", 10.0, 2, Balance::RoundRobin),
        vec![HostPattern::Suffix(".example.org".into())],
        "/".into(),
    ));
    routes.push((
        route(m, "any", 10.0, 2, Balance::RoundRobin),
        vec![HostPattern::Any],
        "/".into(),
    ));
    Snapshot::new(routes, settings())
}

/// A browser-like request head (what a proxy sees most).
pub fn browser_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in [
        ("host", "www.example.org"),
        (
            "user-agent",
            "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
        ),
        (
            "accept",
            "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
        ),
        ("accept-language", "en-US,en;q=0.5"),
        ("accept-encoding", "gzip, deflate, br"),
        ("referer", "https://www.example.org/"),
        ("cookie", "session=abc123; theme=dark"),
        ("upgrade-insecure-requests", "1"),
        ("sec-fetch-dest", "document"),
        ("sec-fetch-mode", "navigate"),
    ] {
        h.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
    }
    h
}
