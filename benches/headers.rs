//! Header rewriting on the request path: `headers::remove_hop_by_hop` and
//! the forwarding headers (`append_forwarded_for`, `new_request_id`), on a
//! browser-like request head.
//!
//! Compares: a head with no hop-by-hop headers (the fast path, what most
//! HTTP/1.1 and every HTTP/2 request carries) vs one with `Connection`
//! naming extra headers; `X-Forwarded-For` set fresh vs appended to; the
//! cost of cloning the head (what a copy of the map would add).
//!
//! `cargo bench --bench headers`

mod common;

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use http::HeaderValue;
use switchyard::testing::headers::{
    append_forwarded_for, new_request_id, remove_hop_by_hop, X_FORWARDED_FOR,
};

fn bench(c: &mut Criterion) {
    let plain = common::browser_headers();
    let mut hop = common::browser_headers();
    hop.insert(
        http::header::CONNECTION,
        HeaderValue::from_static("keep-alive, x-trace"),
    );
    hop.insert("keep-alive", HeaderValue::from_static("timeout=5"));
    hop.insert("x-trace", HeaderValue::from_static("1"));
    let mut forwarded = common::browser_headers();
    forwarded.insert(
        X_FORWARDED_FOR.clone(),
        HeaderValue::from_static("203.0.113.9"),
    );
    let ip = HeaderValue::from_static("127.0.0.1");

    let mut g = c.benchmark_group("headers");
    g.bench_function("clone head (baseline)", |b| {
        b.iter(|| black_box(plain.clone()))
    });
    g.bench_function("remove_hop_by_hop/none present", |b| {
        b.iter_batched_ref(
            || plain.clone(),
            |h| black_box(remove_hop_by_hop(h)),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("remove_hop_by_hop/connection names two", |b| {
        b.iter_batched_ref(
            || hop.clone(),
            |h| black_box(remove_hop_by_hop(h)),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("append_forwarded_for/fresh", |b| {
        b.iter_batched_ref(
            || plain.clone(),
            |h| append_forwarded_for(h, black_box(&ip)),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("append_forwarded_for/append", |b| {
        b.iter_batched_ref(
            || forwarded.clone(),
            |h| append_forwarded_for(h, black_box(&ip)),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("new_request_id", |b| b.iter(|| black_box(new_request_id())));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
