//! Per-pool outcome counters for the rollout analysis (SPEC §10): how many
//! requests each pool answered, how many failed (by kind), and a latency
//! histogram with fixed log buckets.
//!
//! The request path makes at most three relaxed atomic adds here per
//! request (requests, the latency bucket, and a failure counter only when
//! it failed): no lock, no allocation. The counters only grow; the rollout
//! driver (one task per service) reads them every tick and works on the
//! differences, so it can cut them into per-second (or per-tick) slots and
//! trailing windows itself, away from the request path, and no count is
//! ever lost to a slot being reset under a concurrent add. That is what
//! makes `impact.user_failures` exact.

use std::sync::atomic::{AtomicU64, Ordering};
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
pub(crate) struct PoolOutcomes {
    requests: AtomicU64,
    status_5xx: AtomicU64,
    transport: AtomicU64,
    latency: [AtomicU64; LATENCY_BUCKETS],
}

impl PoolOutcomes {
    fn new() -> PoolOutcomes {
        PoolOutcomes {
            requests: AtomicU64::new(0),
            status_5xx: AtomicU64::new(0),
            transport: AtomicU64::new(0),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    /// Counts one request the client got an answer (or an error) for.
    #[inline]
    pub(crate) fn record(&self, outcome: Outcome, elapsed: Duration) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.latency[latency_bucket(micros)].fetch_add(1, Ordering::Relaxed);
        match outcome {
            Outcome::Ok => {}
            Outcome::Status5xx => {
                self.status_5xx.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::Transport => {
                self.transport.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// A copy of the counters (read by the driver, never on the request path).
    pub(crate) fn read(&self) -> PoolCounts {
        PoolCounts {
            requests: self.requests.load(Ordering::Relaxed),
            status_5xx: self.status_5xx.load(Ordering::Relaxed),
            transport: self.transport.load(Ordering::Relaxed),
            latency: std::array::from_fn(|i| self.latency[i].load(Ordering::Relaxed)),
        }
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
