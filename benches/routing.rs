//! The routing decision on one snapshot, as the request path makes it:
//! `Snapshot::find` (host then longest prefix), `routing::choose_pool`
//! (preview header, sticky bucket, weights) and `routing::pick_backend`
//! (balance policy, failover).
//!
//! Compares: each step alone and the whole decision; one service vs ten
//! (exact hosts, wildcards, prefixes); a fresh random bucket vs a sticky
//! cookie; round robin vs least request (power of two choices); and the
//! targeting rules (SPEC §8): no rules vs ten realistic rules that all miss
//! vs ten where the last matches vs the worst case, ten cookie-only rules
//! that all miss (the Cookie header is scanned ten times; cheaper
//! conditions are tried first, so mixed rules rarely get that far).
//!
//! `cargo bench --bench routing`

mod common;

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderValue};
use switchyard::testing::color::Color;
use switchyard::testing::config::RuleSpec;
use switchyard::testing::metrics::Metrics;
use switchyard::testing::routing::{choose_pool, pick_backend, RequestFacts, Route, Rule};

/// Ten realistic rules (two conditions each, every form) of which none
/// matches the browser request below, unless `last_matches`.
fn ten_rules(m: &Metrics, last_matches: bool) -> Box<[Rule]> {
    let conds: [[&str; 2]; 10] = [
        ["header:x-beta=1", "cookie:plan=pro"],
        ["cookie:plan=enterprise", "query:tenant=acme"],
        ["client:10.0.0.0/8", "path_prefix:/admin"],
        ["header:x-employee", "client:192.168.0.0/16"],
        ["query:canary=1", "header:user-agent=curl/8"],
        ["cookie:cohort=b", "path_prefix:/api"],
        ["client:2001:db8::/32", "header:x-beta"],
        ["header:x-tenant=acme", "query:debug"],
        ["cookie:session=zzz", "client:172.16.0.0/12"],
        ["path_prefix:/beta", "header:x-ring=0"],
    ];
    conds
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let mut conditions: Vec<String> = c.iter().map(|s| s.to_string()).collect();
            if last_matches && i == 9 {
                conditions = vec!["cookie:theme=dark".into(), "client:203.0.113.0/24".into()];
            }
            let spec = RuleSpec {
                name: format!("rule-{i}"),
                conditions,
                to: Color::Green,
                fallback: false,
            };
            Rule::compile(&spec, m.rule_matches("bench", &spec.name)).expect("rule")
        })
        .collect()
}

/// Ten rules of two cookie conditions each, none of which matches.
fn ten_cookie_rules(m: &Metrics) -> Box<[Rule]> {
    (0..10)
        .map(|i| {
            let spec = RuleSpec {
                name: format!("cookie-{i}"),
                conditions: vec![format!("cookie:cohort=c{i}"), "cookie:plan=pro".into()],
                to: Color::Green,
                fallback: false,
            };
            Rule::compile(&spec, m.rule_matches("bench", &spec.name)).expect("rule")
        })
        .collect()
}

fn with_rules(base: &Route, rules: Box<[Rule]>) -> Route {
    Route {
        service: base.service.clone(),
        weights: base.weights,
        generation: base.generation,
        pools: base.pools.clone(),
        rules,
        mirror: None,
    }
}

fn bench(c: &mut Criterion) {
    let m = Metrics::new();
    let single = common::single(&m);
    let ten = common::ten(&m);
    let plain = HeaderMap::new();
    let mut sticky = common::browser_headers();
    sticky.insert(
        http::header::COOKIE,
        HeaderValue::from_static("session=abc123; switchyard_bucket=4242; theme=dark"),
    );

    let uri: http::Uri = "/index.html?utm_source=news".parse().expect("uri");
    let client = std::net::IpAddr::from([203, 0, 113, 9]);
    let plain_facts = RequestFacts::new(&plain, &uri, client);
    let sticky_facts = RequestFacts::new(&sticky, &uri, client);
    let plain = plain_facts;
    let sticky = sticky_facts;

    let mut g = c.benchmark_group("routing");
    g.bench_function("find/1 service", |b| {
        b.iter(|| black_box(single.find(black_box("www.example.org"), black_box("/index.html"))))
    });
    g.bench_function("find/10 services", |b| {
        b.iter(|| {
            black_box(ten.find(
                black_box("www.example.org:8080"),
                black_box("/api/v1/users"),
            ))
        })
    });
    let route = single.find("www.example.org", "/").expect("route");
    g.bench_function("choose_pool/fresh bucket", |b| {
        b.iter(|| black_box(choose_pool(route, black_box(&plain))))
    });
    g.bench_function("choose_pool/sticky cookie", |b| {
        b.iter(|| black_box(choose_pool(route, black_box(&sticky))))
    });
    let choice = choose_pool(route, &plain);
    g.bench_function("pick_backend/round robin", |b| {
        b.iter(|| {
            let mut ch = choice;
            black_box(pick_backend(route, &mut ch, &[]).map(|p| p.backend.in_flight()))
        })
    });
    let api = ten.find("a.example.org", "/api/x").expect("route");
    let api_choice = choose_pool(api, &plain);
    g.bench_function("pick_backend/least request", |b| {
        b.iter(|| {
            let mut ch = api_choice;
            black_box(pick_backend(api, &mut ch, &[]).map(|p| p.backend.in_flight()))
        })
    });
    g.bench_function("decision/1 service", |b| {
        b.iter(|| {
            let r = single
                .find(black_box("www.example.org"), black_box("/"))
                .expect("route");
            let mut ch = choose_pool(r, black_box(&plain));
            black_box(pick_backend(r, &mut ch, &[]).map(|p| p.backend.in_flight()))
        })
    });
    g.bench_function("decision/10 services, sticky", |b| {
        b.iter(|| {
            let r = ten
                .find(black_box("a.example.org"), black_box("/api/x"))
                .expect("route");
            let mut ch = choose_pool(r, black_box(&sticky));
            black_box(pick_backend(r, &mut ch, &[]).map(|p| p.backend.in_flight()))
        })
    });
    // Targeting rules: the same decision (sticky cookie, so the bucket is
    // not random) on a route without rules, with ten that all miss, and
    // with ten whose last one matches.
    let base = single.find("www.example.org", "/").expect("route");
    let none = with_rules(base, Box::new([]));
    let ten_miss = with_rules(base, ten_rules(&m, false));
    let ten_last = with_rules(base, ten_rules(&m, true));
    let ten_cookie = with_rules(base, ten_cookie_rules(&m));
    for (label, r) in [
        ("rules/none", &none),
        ("rules/10, none match", &ten_miss),
        ("rules/10, last matches", &ten_last),
        ("rules/10 cookie-only, none match", &ten_cookie),
    ] {
        g.bench_function(label, |b| {
            b.iter(|| {
                let mut ch = choose_pool(r, black_box(&sticky));
                black_box(pick_backend(r, &mut ch, &[]).map(|p| p.backend.in_flight()))
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
