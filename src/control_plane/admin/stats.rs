//! `GET /api/v1/stats` (SPEC §12): request rate and error ratio per pool,
//! over the last 10 s and 60 s, of this replica.
//!
//! One task wakes every second, reads the counters behind
//! `switchyard_requests_total` through the pools' pre-resolved handles (the
//! same atomics `/metrics` renders), and keeps a ring of 61 samples. Nothing
//! is added to the request path: a request bumps exactly the counters it
//! bumped before. Each tick publishes a ready-to-send JSON document through
//! a `watch` channel, read by `/api/v1/stats` and by every event stream.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use serde::Serialize;
use tokio::sync::watch;

use crate::color::Color;
use crate::data_plane::backend::now_ms;
use crate::data_plane::routing::Snapshot;
use crate::weights::Weights;

/// Samples kept: one a second, enough for a 60 s window.
const RING: usize = 61;

/// The short and long windows, in seconds.
const WINDOWS: [u64; 2] = [10, 60];

/// Counters of one pool at one instant: `(answered, answered with 5xx)`.
type Counts = [(u64, u64); 2];

struct Sample {
    at: Instant,
    pools: HashMap<Arc<str>, Counts>,
}

/// One pool's rates.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct PoolStats {
    /// Requests answered per second over the last 10 s.
    pub(crate) rps_10s: f64,
    /// Requests answered per second over the last 60 s.
    pub(crate) rps_60s: f64,
    /// Share of 5xx answers over the last 10 s; `None` (JSON `null`) when
    /// no request was answered.
    pub(crate) error_ratio_10s: Option<f64>,
    /// The same over 60 s.
    pub(crate) error_ratio_60s: Option<f64>,
    /// Backends taking traffic now.
    pub(crate) healthy: usize,
    /// Backends in the pool.
    pub(crate) backends: usize,
}

/// Both pools of one service.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct PoolsStats {
    /// Blue.
    pub(crate) blue: PoolStats,
    /// Green.
    pub(crate) green: PoolStats,
}

/// One service.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ServiceStats {
    /// Name.
    pub(crate) name: String,
    /// `blue`, `green` or `split`.
    pub(crate) live: &'static str,
    /// Current weights.
    pub(crate) weights: Weights,
    /// Current generation.
    pub(crate) generation: u64,
    /// Rates per pool.
    pub(crate) pools: PoolsStats,
}

/// The `/api/v1/stats` document.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Stats {
    /// Which replica counted (the admin listener's address): the rates are
    /// this replica's, not the fleet's.
    pub(crate) replica: String,
    /// When the sample was taken (RFC 3339, UTC).
    pub(crate) at: String,
    /// Seconds of samples actually behind the 60 s figures (less than 60
    /// just after start).
    pub(crate) covered_s: f64,
    /// Every service, in config order.
    pub(crate) services: Vec<ServiceStats>,
}

/// The sampler's state between ticks.
pub(crate) struct Sampler {
    ring: VecDeque<Sample>,
    replica: String,
}

impl Sampler {
    /// An empty sampler for the replica named `replica`.
    pub(crate) fn new(replica: String) -> Sampler {
        Sampler {
            ring: VecDeque::with_capacity(RING),
            replica,
        }
    }

    /// Takes one sample of `snapshot` at `now` and computes the rates.
    pub(crate) fn tick(&mut self, snapshot: &Snapshot, now: Instant, wall: SystemTime) -> Stats {
        let mut pools = HashMap::with_capacity(snapshot.routes.len());
        for r in &snapshot.routes {
            let counts = [Color::Blue, Color::Green].map(|c| r.service.pool_metrics(c).answered());
            pools.insert(Arc::clone(&r.service.name), counts);
        }
        if self.ring.len() == RING {
            self.ring.pop_front();
        }
        self.ring.push_back(Sample { at: now, pools });
        let now_ms = now_ms();
        let mut services = Vec::with_capacity(snapshot.routes.len());
        for r in &snapshot.routes {
            let pool = |c: Color| {
                let [short, long] = WINDOWS.map(|w| self.rate(&r.service.name, c, w));
                let backends = &r.pool(c).backends;
                PoolStats {
                    rps_10s: short.0,
                    rps_60s: long.0,
                    error_ratio_10s: short.1,
                    error_ratio_60s: long.1,
                    healthy: backends.iter().filter(|b| b.is_available(now_ms)).count(),
                    backends: backends.len(),
                }
            };
            services.push(ServiceStats {
                name: r.service.name.to_string(),
                live: r.weights.live().as_str(),
                weights: r.weights,
                generation: r.generation,
                pools: PoolsStats {
                    blue: pool(Color::Blue),
                    green: pool(Color::Green),
                },
            });
        }
        let covered_s = match (self.ring.front(), self.ring.back()) {
            (Some(a), Some(b)) => b.at.saturating_duration_since(a.at).as_secs_f64(),
            _ => 0.0,
        };
        Stats {
            replica: self.replica.clone(),
            at: humantime::format_rfc3339_seconds(wall).to_string(),
            covered_s,
            services,
        }
    }

    /// `(requests per second, 5xx ratio)` of one pool over the last
    /// `window` seconds: from the oldest sample within the window to the
    /// newest. A service that appeared since counts from its first sample.
    fn rate(&self, service: &str, color: Color, window: u64) -> (f64, Option<f64>) {
        let Some(last) = self.ring.back() else {
            return (0.0, None);
        };
        let Some(now) = last.pools.get(service).map(|c| c[color.index()]) else {
            return (0.0, None);
        };
        let horizon = Duration::from_secs(window) + Duration::from_millis(500);
        let first = self.ring.iter().find(|s| {
            last.at.saturating_duration_since(s.at) <= horizon && s.pools.contains_key(service)
        });
        let Some(first) = first else {
            return (0.0, None);
        };
        let then = first
            .pools
            .get(service)
            .map_or((0, 0), |c| c[color.index()]);
        let dt = last.at.saturating_duration_since(first.at).as_secs_f64();
        // A counter that went backwards (the service was removed and added
        // again) counts as a fresh start, never as a negative rate.
        let total = now.0.saturating_sub(then.0);
        let errors = now.1.saturating_sub(then.1).min(total);
        let rps = if dt > 0.0 { total as f64 / dt } else { 0.0 };
        let ratio = (total > 0).then(|| errors as f64 / total as f64);
        (round(rps, 100.0), ratio.map(|r| round(r, 10_000.0)))
    }
}

fn round(x: f64, scale: f64) -> f64 {
    (x * scale).round() / scale
}

/// Starts the 1 s sampler over `table`; the receiver always holds the
/// latest `/api/v1/stats` document, serialised.
pub(crate) fn spawn(table: Arc<ArcSwap<Snapshot>>, replica: String) -> watch::Receiver<Bytes> {
    let mut sampler = Sampler::new(replica);
    let first = sampler.tick(&table.load(), Instant::now(), SystemTime::now());
    let (tx, rx) = watch::channel(to_json(&first));
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(1));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        every.tick().await;
        loop {
            tokio::select! {
                _ = every.tick() => {}
                () = tx.closed() => return,
            }
            let stats = sampler.tick(&table.load(), Instant::now(), SystemTime::now());
            tx.send_replace(to_json(&stats));
        }
    });
    rx
}

fn to_json(stats: &Stats) -> Bytes {
    Bytes::from(serde_json::to_vec(stats).unwrap_or_else(|_| b"{}".to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at: Instant, blue: (u64, u64)) -> Sample {
        let mut pools = HashMap::new();
        pools.insert(Arc::from("web"), [blue, (0, 0)]);
        Sample { at, pools }
    }

    #[test]
    fn rates_over_each_window_and_null_ratio_without_traffic() {
        let t0 = Instant::now();
        let mut s = Sampler::new("r".into());
        // 0..=60 s: 10 requests a second, one 5xx in every ten, for the
        // first 50 s; then 20 a second with no error.
        let mut total = 0;
        let mut errors = 0;
        for i in 0..=60u64 {
            s.ring
                .push_back(sample(t0 + Duration::from_secs(i), (total, errors)));
            if i < 50 {
                total += 10;
                errors += 1;
            } else {
                total += 20;
            }
        }
        let (rps10, err10) = s.rate("web", Color::Blue, 10);
        assert_eq!(rps10, 20.0);
        assert_eq!(err10, Some(0.0));
        let (rps60, err60) = s.rate("web", Color::Blue, 60);
        assert!((rps60 - 11.67).abs() < 1e-9, "{rps60}");
        assert!((err60.unwrap_or(0.0) - 50.0 / 700.0).abs() < 1e-3);
        let (rps, ratio) = s.rate("web", Color::Green, 10);
        assert_eq!(
            (rps, ratio),
            (0.0, None),
            "no traffic: ratio unknown, not 0"
        );
        assert_eq!(s.rate("nope", Color::Blue, 10), (0.0, None));
    }

    #[test]
    fn a_counter_that_restarts_never_gives_a_negative_rate() {
        let t0 = Instant::now();
        let mut s = Sampler::new("r".into());
        s.ring.push_back(sample(t0, (1000, 10)));
        s.ring
            .push_back(sample(t0 + Duration::from_secs(1), (5, 1)));
        assert_eq!(s.rate("web", Color::Blue, 10), (0.0, None));
    }
}
