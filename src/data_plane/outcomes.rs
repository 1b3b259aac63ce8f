//! Per-pool outcome counters for the rollout analysis (SPEC §10): how many
//! requests each pool answered, how many failed (by kind), and a latency
//! histogram with fixed log buckets.
//!
//! The request path makes at most three relaxed atomic adds here per
//! request (requests, the latency bucket, and a failure counter only when
//! it failed), on its worker's own copy of the counters: no lock, no
//! allocation, no cache line shared with another worker. The counters
//! only grow; the rollout driver (one task per service) reads them every
//! tick and works on the
//! differences, so it can cut them into per-second (or per-tick) slots and
//! trailing windows itself, away from the request path, and no count is
//! ever lost to a slot being reset under a concurrent add. That is what
//! makes `impact.user_failures` exact.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use crate::color::Color;

/// Latency buckets: 8 per power of two of microseconds (≤ 9 % wide), from
/// 1 µs to about 67 s; the last bucket takes anything longer.
pub(crate) const LATENCY_BUCKETS: usize = 200;

/// The bucket of a duration in microseconds.
#[inline]
pub(crate) fn latency_bucket(micros: u64) -> usize {
    if micros < 8 {
        return micros as usize;
    }
    let log2 = 63 - micros.leading_zeros() as usize;
    let sub = ((micros >> (log2 - 3)) & 7) as usize;
    ((log2 - 2) * 8 + sub).min(LATENCY_BUCKETS - 1)
}

/// The lowest and the highest-plus-one duration (µs) in bucket `i`.
pub(crate) fn bucket_bounds(i: usize) -> (u64, u64) {
    if i < 8 {
        return (i as u64, i as u64 + 1);
    }
    let log2 = i / 8 + 2;
    let sub = (i % 8) as u64;
    ((8 + sub) << (log2 - 3), (9 + sub) << (log2 - 3))
}

/// What happened to a request, as the client saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Answered by the backend with a status below 500 and, if streamed,
    /// a body that ended cleanly (or the client left).
    Ok,
    /// The backend answered 5xx.
    Status5xx,
    /// The proxy answered 502/503/504 for this pool (connect, timeout,
    /// reset, tls, no healthy backend) or the body broke off.
    Transport,
}

/// Counters of one pool. Only grow.
///
/// Kept in [`SHARDS`] copies: each thread adds to its own
/// ([`shard_index`]), so the workers, which answer the same pool's
/// requests at the same time, never write one cache line; a reading sums
/// the copies. (One shared set cost every request two or three atomic adds
/// on lines that moved between cores; `perf annotate` counted such adds
/// among the hottest instructions of the request path.)
pub(crate) struct PoolOutcomes {
    shards: [Shard; SHARDS],
}

/// Copies of each pool's counters: enough for the usual worker counts;
/// with more workers some share a copy (still exact, only slower).
const SHARDS: usize = 4;

/// One copy of a pool's counters, on cache lines of its own.
#[repr(align(128))]
struct Shard {
    requests: AtomicU64,
    status_5xx: AtomicU64,
    transport: AtomicU64,
    latency: [AtomicU64; LATENCY_BUCKETS],
}

/// This thread's copy: threads are numbered in the order they first
/// record (the workers, as their first requests end).
fn shard_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static INDEX: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    INDEX.with(|i| *i)
}

impl PoolOutcomes {
    fn new() -> PoolOutcomes {
        PoolOutcomes {
            shards: std::array::from_fn(|_| Shard {
                requests: AtomicU64::new(0),
                status_5xx: AtomicU64::new(0),
                transport: AtomicU64::new(0),
                latency: std::array::from_fn(|_| AtomicU64::new(0)),
            }),
        }
    }

    /// Counts one request the client got an answer (or an error) for.
    #[inline]
    pub(crate) fn record(&self, outcome: Outcome, elapsed: Duration) {
        let s = &self.shards[shard_index()];
        s.requests.fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        s.latency[latency_bucket(micros)].fetch_add(1, Ordering::Relaxed);
        match outcome {
            Outcome::Ok => {}
            Outcome::Status5xx => {
                s.status_5xx.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::Transport => {
                s.transport.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// A copy of the counters, the sum of the shards (read by the driver,
    /// never on the request path). Each shard only grows and a later
    /// reading reads every shard later, so readings only grow too.
    pub(crate) fn read(&self) -> PoolCounts {
        let mut c = PoolCounts::default();
        for s in &self.shards {
            c.requests += s.requests.load(Ordering::Relaxed);
            c.status_5xx += s.status_5xx.load(Ordering::Relaxed);
            c.transport += s.transport.load(Ordering::Relaxed);
            for (sum, n) in c.latency.iter_mut().zip(&s.latency) {
                *sum += n.load(Ordering::Relaxed);
            }
        }
        c
    }
}

/// The counters of both pools of one service. One per service name for the
/// life of the process (kept across config reloads that rebuild the
/// service), handed out by `Metrics::outcomes`.
pub(crate) struct ServiceOutcomes {
    pools: [PoolOutcomes; 2],
}

impl ServiceOutcomes {
    /// Zeroed counters.
    pub(crate) fn new() -> ServiceOutcomes {
        ServiceOutcomes {
            pools: [PoolOutcomes::new(), PoolOutcomes::new()],
        }
    }

    /// The counters of one pool.
    #[inline]
    pub(crate) fn pool(&self, color: Color) -> &PoolOutcomes {
        &self.pools[color.index()]
    }
}

impl Default for ServiceOutcomes {
    fn default() -> Self {
        Self::new()
    }
}

/// A reading of one pool's counters, or the difference of two readings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PoolCounts {
    /// Requests answered.
    pub(crate) requests: u64,
    /// Of which the backend answered 5xx.
    pub(crate) status_5xx: u64,
    /// Of which failed in transport (the proxy's 502/503/504, broken bodies).
    pub(crate) transport: u64,
    /// Requests per latency bucket.
    pub(crate) latency: [u64; LATENCY_BUCKETS],
}

impl Default for PoolCounts {
    fn default() -> Self {
        PoolCounts {
            requests: 0,
            status_5xx: 0,
            transport: 0,
            latency: [0; LATENCY_BUCKETS],
        }
    }
}

impl PoolCounts {
    /// `self - earlier` (saturating: counters only grow).
    pub(crate) fn since(&self, earlier: &PoolCounts) -> PoolCounts {
        PoolCounts {
            requests: self.requests.saturating_sub(earlier.requests),
            status_5xx: self.status_5xx.saturating_sub(earlier.status_5xx),
            transport: self.transport.saturating_sub(earlier.transport),
            latency: std::array::from_fn(|i| self.latency[i].saturating_sub(earlier.latency[i])),
        }
    }

    /// Adds `other` into `self`.
    pub(crate) fn add(&mut self, other: &PoolCounts) {
        self.requests += other.requests;
        self.status_5xx += other.status_5xx;
        self.transport += other.transport;
        for (a, b) in self.latency.iter_mut().zip(other.latency.iter()) {
            *a += b;
        }
    }

    /// The latency (µs, upper bound of its bucket) at quantile `q`, if
    /// there is any sample.
    pub(crate) fn quantile_micros(&self, q: f64) -> Option<u64> {
        let total: u64 = self.latency.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.latency.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(bucket_bounds(i).1);
            }
        }
        Some(bucket_bounds(LATENCY_BUCKETS - 1).1)
    }

    /// Samples whose whole bucket lies above `micros`.
    pub(crate) fn above_micros(&self, micros: u64) -> u64 {
        self.latency
            .iter()
            .enumerate()
            .filter(|(i, _)| bucket_bounds(*i).0 > micros)
            .map(|(_, n)| n)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_record_into_their_own_copies_and_a_reading_sums_them_exactly() {
        let o = std::sync::Arc::new(ServiceOutcomes::new());
        // More threads than copies: some share one, and nothing is lost.
        let threads: Vec<_> = (0..SHARDS as u64 + 3)
            .map(|_| {
                let o = std::sync::Arc::clone(&o);
                std::thread::spawn(move || {
                    for i in 0..1000 {
                        let outcome = match i % 10 {
                            0 => Outcome::Status5xx,
                            1 => Outcome::Transport,
                            _ => Outcome::Ok,
                        };
                        o.pool(Color::Green)
                            .record(outcome, Duration::from_micros(100));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("a recording thread");
        }
        let n = (SHARDS as u64 + 3) * 1000;
        let c = o.pool(Color::Green).read();
        assert_eq!(c.requests, n);
        assert_eq!(c.status_5xx, n / 10);
        assert_eq!(c.transport, n / 10);
        assert_eq!(c.latency.iter().sum::<u64>(), n);
        assert_eq!(
            c.latency[latency_bucket(100)],
            n,
            "every request took 100 µs"
        );
        assert_eq!(o.pool(Color::Blue).read(), PoolCounts::default());
    }

    #[test]
    fn buckets_are_monotonic_and_contain_their_values() {
        let mut last = 0;
        for micros in (0..100_000u64).chain([1 << 20, 1 << 25, 1 << 26, u64::MAX]) {
            let b = latency_bucket(micros);
            assert!(b >= last || micros >= 1 << 20, "{micros}");
            last = b;
            if b < LATENCY_BUCKETS - 1 {
                let (lo, hi) = bucket_bounds(b);
                assert!(lo <= micros && micros < hi, "{micros} not in {lo}..{hi}");
                assert!(hi - lo <= (lo / 8).max(1), "bucket {b} wider than 12.5 %");
            }
        }
        assert_eq!(latency_bucket(u64::MAX), LATENCY_BUCKETS - 1);
    }

    #[test]
    fn counts_and_quantiles() {
        let o = ServiceOutcomes::new();
        let p = o.pool(Color::Green);
        for i in 0..199 {
            p.record(Outcome::Ok, Duration::from_micros(1000 + i));
        }
        p.record(Outcome::Status5xx, Duration::from_millis(50));
        p.record(Outcome::Transport, Duration::from_millis(50));
        let c = p.read();
        assert_eq!((c.requests, c.status_5xx, c.transport), (201, 1, 1));
        let p99 = c.quantile_micros(0.99).expect("samples");
        assert!((1000..=1280).contains(&p99), "{p99}");
        assert_eq!(c.above_micros(40_000), 2);
        assert_eq!(c.since(&c), PoolCounts::default());
        assert_eq!(o.pool(Color::Blue).read(), PoolCounts::default());
    }
}
