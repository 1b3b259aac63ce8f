//! The routing-table swap: `ArcSwap::load_full` on the request path while
//! the control plane `store`s new snapshots.
//!
//! Compares: `load_full` (what `Proxy::handle` does once per request) with
//! no writer, and while another thread stores a new snapshot continuously;
//! `store` with no readers, and while two reader threads `load_full` in a
//! loop. A switch must not slow requests down, and a swap must stay cheap
//! under load.
//!
//! `cargo bench --bench snapshot_swap`

mod common;

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;

use arc_swap::ArcSwap;
use criterion::{criterion_group, criterion_main, Criterion};
use switchyard::testing::metrics::Metrics;
use switchyard::testing::routing::Snapshot;

fn bench(c: &mut Criterion) {
    let m = Metrics::new();
    let snaps: Vec<Arc<Snapshot>> = (0..4).map(|_| Arc::new(common::single(&m))).collect();
    let table = Arc::new(ArcSwap::from(Arc::clone(&snaps[0])));

    let mut g = c.benchmark_group("snapshot_swap");
    g.bench_function("load_full/no writer", |b| {
        b.iter(|| black_box(table.load_full()))
    });

    // One thread storing as fast as it can.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (table, stop, snaps) = (Arc::clone(&table), Arc::clone(&stop), snaps.clone());
        thread::spawn(move || {
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                i = i.wrapping_add(1);
                table.store(Arc::clone(&snaps[i % snaps.len()]));
            }
        })
    };
    g.bench_function("load_full/writer storing continuously", |b| {
        b.iter(|| black_box(table.load_full()))
    });
    stop.store(true, Ordering::Relaxed);
    let _ = writer.join();

    let mut i = 0usize;
    g.bench_function("store/no readers", |b| {
        b.iter(|| {
            i = i.wrapping_add(1);
            table.store(Arc::clone(&snaps[i % snaps.len()]));
        })
    });

    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (table, stop) = (Arc::clone(&table), Arc::clone(&stop));
            thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let s = table.load_full();
                    n = n.wrapping_add(s.routes.len() as u64);
                }
                n
            })
        })
        .collect();
    g.bench_function("store/2 readers load_full continuously", |b| {
        b.iter(|| {
            i = i.wrapping_add(1);
            table.store(Arc::clone(&snaps[i % snaps.len()]));
        })
    });
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        let _ = black_box(r.join());
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
