//! The routing decision on one snapshot, as the request path makes it:
//! `Snapshot::find` (host then longest prefix), `routing::choose_pool`
//! (preview header, sticky bucket, weights) and `routing::pick_backend`
//! (balance policy, failover).
//!
//! Compares: each step alone and the whole decision; one service vs ten
//! (exact hosts, wildcards, prefixes); a fresh random bucket vs a sticky
//! cookie; round robin vs least request (power of two choices).
//!
//! `cargo bench --bench routing`

mod common;

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderValue};
use switchyard::testing::metrics::Metrics;
use switchyard::testing::routing::{choose_pool, pick_backend};

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
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
