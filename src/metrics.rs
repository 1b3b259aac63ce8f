//! Prometheus metrics (SPEC §5), owned by one [`Metrics`] value created at
//! start and passed down (no globals).
//!
//! The request path never formats a label: every service and pool resolves
//! its counters once into a [`PoolMetrics`] when the service is built, and a
//! request only bumps atomics through those handles.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use std::collections::HashMap;
use std::sync::Arc;

use crate::color::Color;
use crate::data_plane::outcomes::{Outcome, ServiceOutcomes};

/// Upper bounds of the request duration histogram, in seconds.
const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// `action` values of `switchyard_routing_changes_total` (SPEC §5).
const ROUTING_ACTIONS: [&str; 6] = ["switch", "split", "rollback", "pool", "rules", "mirror"];

/// `code` values of `switchyard_mirror_requests_total`: the status classes
/// of the mirror's answers, `timeout` (none within the mirror's timeout)
/// and `error` (connect failed, connection broke).
pub(crate) const MIRROR_CODES: [&str; 7] = ["1xx", "2xx", "3xx", "4xx", "5xx", "timeout", "error"];

/// `code` values of `switchyard_requests_total`: the status classes, and
/// `499` for requests the client abandoned before the response head (nginx's
/// convention; HTTP/1 close or HTTP/2 stream reset).
const CODES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "499"];

/// Index in [`CODES`] of `status` (0: the client abandoned the request).
#[inline]
fn code_index(status: u16) -> usize {
    if status == 0 {
        return 5;
    }
    usize::from((status / 100).clamp(1, 5) - 1)
}

/// Kinds of upstream error (`kind` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UpstreamErrorKind {
    /// Could not connect.
    Connect,
    /// Connect or response head timed out.
    Timeout,
    /// Connection broke mid-exchange.
    Reset,
    /// TLS handshake failed.
    Tls,
    /// The response body ended before its declared end (connection closed
    /// or reset mid-body, bad chunked framing).
    Truncated,
    /// The response head had more header fields than
    /// `[proxy] max_response_headers` (or exceeded hyper's head size limit).
    HeadTooLarge,
}

impl UpstreamErrorKind {
    const ALL: [UpstreamErrorKind; 6] = [
        UpstreamErrorKind::Connect,
        UpstreamErrorKind::Timeout,
        UpstreamErrorKind::Reset,
        UpstreamErrorKind::Tls,
        UpstreamErrorKind::Truncated,
        UpstreamErrorKind::HeadTooLarge,
    ];

    /// Label value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            UpstreamErrorKind::Connect => "connect",
            UpstreamErrorKind::Timeout => "timeout",
            UpstreamErrorKind::Reset => "reset",
            UpstreamErrorKind::Tls => "tls",
            UpstreamErrorKind::Truncated => "truncated",
            UpstreamErrorKind::HeadTooLarge => "head_too_large",
        }
    }
}

/// The fleet-mode series (SPEC §11).
#[derive(Clone)]
pub(crate) struct FleetMetrics {
    /// `switchyard_state_backend_connected`.
    pub(crate) connected: prometheus::Gauge,
    /// `switchyard_state_staleness_seconds`.
    pub(crate) staleness: prometheus::Gauge,
    /// `switchyard_state_resyncs_total{reason}`.
    pub(crate) resyncs: IntCounterVec,
    /// `switchyard_state_rejected_values_total{service}`.
    pub(crate) rejected: IntCounterVec,
}

/// Every metric of SPEC §5, registered in one registry.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    duration: HistogramVec,
    upstream_errors: IntCounterVec,
    backend_healthy: IntGaugeVec,
    pool_weight: prometheus::GaugeVec,
    routing_changes: IntCounterVec,
    failovers: IntCounterVec,
    /// `switchyard_rule_matches_total{service,rule}` (SPEC §8).
    rule_matches: IntCounterVec,
    /// `switchyard_open_connections{listener}`.
    pub(crate) open_connections: IntGaugeVec,
    config_reloads: IntCounterVec,
    /// `switchyard_requests_total{service="",pool=""}`: no service matched.
    unmatched: [IntCounter; 6],
    /// Upgraded connections closed because their pool stopped taking traffic.
    pub(crate) upgrades_drained: IntCounter,
    /// Connections cut by the header read or idle timeout, by reason.
    pub(crate) timeouts: IntCounterVec,
    /// Connections handed to another worker at accept (`Balance`).
    pub(crate) connections_moved: IntCounter,
    /// `switchyard_connections_refused_total{reason}` (SPEC §14).
    pub(crate) connections_refused: IntCounterVec,
    /// Idle HTTP/1 client connections parked (no hyper state held).
    pub(crate) parked: IntGauge,
    /// Retries sent to another backend.
    pub(crate) retries: IntCounterVec,
    /// Passive ejections of backends.
    pub(crate) ejections: IntCounterVec,
    /// `switchyard_mirror_requests_total{service,pool,code}` (SPEC §9).
    mirror_requests: IntCounterVec,
    /// `switchyard_mirror_dropped_total{service,reason}`.
    mirror_dropped: IntCounterVec,
    /// `switchyard_mirror_duration_seconds{service,pool}`.
    mirror_duration: HistogramVec,
    /// `switchyard_mirror_mismatches_total{service}`.
    mirror_mismatches: IntCounterVec,
    /// `switchyard_rollout_state{service,state}` (SPEC §10).
    rollout_state: IntGaugeVec,
    /// `switchyard_rollout_step{service}`.
    rollout_step: IntGaugeVec,
    /// `switchyard_rollouts_total{service,result}`.
    rollouts: IntCounterVec,
    /// `switchyard_rollout_user_failures_total{service}`.
    rollout_user_failures: IntCounterVec,
    /// Outcome counters of the rollout analysis, one per service name for
    /// the life of the process (a rebuilt service keeps its counters).
    outcomes: std::sync::Mutex<HashMap<String, Arc<ServiceOutcomes>>>,
}

fn must<T>(r: prometheus::Result<T>) -> T {
    // Metric definitions are static; a failure here is a programming error
    // caught by the first test run, never an input problem.
    #[allow(clippy::expect_used)]
    r.expect("static metric definition")
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = must(IntCounterVec::new(Opts::new(name, help), labels));
            must(registry.register(Box::new(c.clone())));
            c
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = must(IntGaugeVec::new(Opts::new(name, help), labels));
            must(registry.register(Box::new(g.clone())));
            g
        };
        let requests = counter(
            "switchyard_requests_total",
            "Requests answered, by service, pool and status class (499: abandoned by the client).",
            &["service", "pool", "code"],
        );
        let duration = must(HistogramVec::new(
            HistogramOpts::new(
                "switchyard_request_duration_seconds",
                "Time from request head to the end of the response body.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["service", "pool"],
        ));
        must(registry.register(Box::new(duration.clone())));
        let upstream_errors = counter(
            "switchyard_upstream_errors_total",
            "Upstream failures by kind: connect, timeout, reset, tls, truncated, head_too_large.",
            &["service", "pool", "kind"],
        );
        let backend_healthy = gauge(
            "switchyard_backend_healthy",
            "1 if the backend takes traffic (healthy and not ejected), else 0.",
            &["service", "pool", "backend"],
        );
        let pool_weight = must(prometheus::GaugeVec::new(
            Opts::new(
                "switchyard_pool_weight",
                "Traffic share of the pool, 0..100.",
            ),
            &["service", "pool"],
        ));
        must(registry.register(Box::new(pool_weight.clone())));
        let routing_changes = counter(
            "switchyard_routing_changes_total",
            "Accepted routing changes, by action.",
            &["service", "action"],
        );
        let failovers = counter(
            "switchyard_failovers_total",
            "Requests sent to the other pool because theirs had no healthy backend.",
            &["service", "from"],
        );
        let rule_matches = counter(
            "switchyard_rule_matches_total",
            "Requests whose conditions all held for a targeting rule (the first such rule).",
            &["service", "rule"],
        );
        let open_connections = gauge(
            "switchyard_open_connections",
            "Open client connections, by listener.",
            &["listener"],
        );
        let connections_refused = counter(
            "switchyard_connections_refused_total",
            "Client connections closed at accept, by reason: max_connections, max_connections_per_client, no_file_descriptors (failed accepts).",
            &["reason"],
        );
        for r in crate::data_plane::conn_limit::Refused::ALL {
            connections_refused.with_label_values(&[r.label()]);
        }
        let config_reloads = counter(
            "switchyard_config_reloads_total",
            "Config reloads, by result.",
            &["result"],
        );
        for r in ["ok", "error"] {
            config_reloads.with_label_values(&[r]);
        }
        let upgrades_drained = must(IntCounter::new(
            "switchyard_upgrades_drained_total",
            "Upgraded (WebSocket) connections closed drain_timeout after their pool stopped taking traffic.",
        ));
        must(registry.register(Box::new(upgrades_drained.clone())));
        let timeouts = counter(
            "switchyard_client_timeouts_total",
            "Client connections closed by a timeout: header_read, idle.",
            &["kind"],
        );
        let connections_moved = must(IntCounter::new(
            "switchyard_connections_moved_total",
            "Client connections a worker handed to a less loaded worker at accept (workers >= 2).",
        ));
        must(registry.register(Box::new(connections_moved.clone())));
        let parked = must(IntGauge::new(
            "switchyard_parked_connections",
            "Idle HTTP/1 client connections parked without buffers.",
        ));
        must(registry.register(Box::new(parked.clone())));
        let retries = counter(
            "switchyard_retries_total",
            "Requests retried on another backend after a failure before any response.",
            &["service", "pool"],
        );
        let ejections = counter(
            "switchyard_backend_ejections_total",
            "Passive ejections of backends after consecutive failures.",
            &["service", "pool"],
        );
        let mirror_requests = counter(
            "switchyard_mirror_requests_total",
            "Mirrored copies by service, mirror pool and outcome: status class, timeout or error.",
            &["service", "pool", "code"],
        );
        let mirror_dropped = counter(
            "switchyard_mirror_dropped_total",
            "Copies not sent, by reason: max_inflight, body_too_large, no_healthy_backend, body_aborted.",
            &["service", "reason"],
        );
        let mirror_duration = must(HistogramVec::new(
            HistogramOpts::new(
                "switchyard_mirror_duration_seconds",
                "Time from sending a copy to the end of its (drained) response.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["service", "pool"],
        ));
        must(registry.register(Box::new(mirror_duration.clone())));
        let mirror_mismatches = counter(
            "switchyard_mirror_mismatches_total",
            "Mirrored requests whose copy's status class differed from the live answer's.",
            &["service"],
        );
        let rollout_state = gauge(
            "switchyard_rollout_state",
            "1 for the state the service's current (or last) rollout is in, else 0.",
            &["service", "state"],
        );
        let rollout_step = gauge(
            "switchyard_rollout_step",
            "Index of the step the service's rollout is at.",
            &["service"],
        );
        let rollouts = counter(
            "switchyard_rollouts_total",
            "Rollouts ended, by result: succeeded, rolled_back, aborted.",
            &["service", "result"],
        );
        let rollout_user_failures = counter(
            "switchyard_rollout_user_failures_total",
            "User requests whose final answer was a failure from a rollout's canary.",
            &["service"],
        );
        let unmatched = CODES.map(|class| requests.with_label_values(&["", "", class]));
        Metrics {
            registry,
            requests,
            duration,
            upstream_errors,
            backend_healthy,
            pool_weight,
            routing_changes,
            failovers,
            rule_matches,
            open_connections,
            connections_refused,
            config_reloads,
            unmatched,
            upgrades_drained,
            timeouts,
            connections_moved,
            parked,
            retries,
            ejections,
            mirror_requests,
            mirror_dropped,
            mirror_duration,
            mirror_mismatches,
            rollout_state,
            rollout_step,
            rollouts,
            rollout_user_failures,
            outcomes: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// The outcome counters of `service` (made on first use).
    pub(crate) fn outcomes(&self, service: &str) -> Arc<ServiceOutcomes> {
        let mut map = self.outcomes.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(
            map.entry(service.to_string())
                .or_insert_with(|| Arc::new(ServiceOutcomes::new())),
        )
    }

    /// Sets the rollout state and step series of `service`.
    pub(crate) fn rollout_set(&self, service: &str, state: &str, step: usize) {
        for s in crate::control_plane::rollout::machine::State::ALL {
            self.rollout_state
                .with_label_values(&[service, s.as_str()])
                .set(i64::from(s.as_str() == state));
        }
        self.rollout_step
            .with_label_values(&[service])
            .set(i64::try_from(step).unwrap_or(i64::MAX));
        for result in ["succeeded", "rolled_back", "aborted"] {
            self.rollouts.with_label_values(&[service, result]);
        }
        self.rollout_user_failures.with_label_values(&[service]);
    }

    /// Fleet mode: this replica no longer drives the rollout of `service`
    /// (another took it over): its state and step series go, so that
    /// only the driving replica reports them.
    pub(crate) fn rollout_forget(&self, service: &str) {
        for s in crate::control_plane::rollout::machine::State::ALL {
            let _ = self
                .rollout_state
                .remove_label_values(&[service, s.as_str()]);
        }
        let _ = self.rollout_step.remove_label_values(&[service]);
    }

    /// Counts a rollout that ended with `result`.
    pub(crate) fn rollout_ended(&self, service: &str, result: &str) {
        self.rollouts.with_label_values(&[service, result]).inc();
    }

    /// Adds user failures from a rollout's canary.
    pub(crate) fn rollout_user_failures(&self, service: &str, n: u64) {
        if n > 0 {
            self.rollout_user_failures
                .with_label_values(&[service])
                .inc_by(n);
        }
    }

    /// Handles for the mirror of `service` to `pool` (looked up when a
    /// snapshot is built; every series starts at 0).
    pub(crate) fn mirror(&self, service: &str, pool: Color) -> MirrorMetrics {
        let p = pool.as_str();
        MirrorMetrics {
            requests: MIRROR_CODES
                .map(|c| self.mirror_requests.with_label_values(&[service, p, c])),
            dropped: crate::data_plane::mirror::Dropped::ALL
                .map(|d| self.mirror_dropped.with_label_values(&[service, d.label()])),
            duration: self.mirror_duration.with_label_values(&[service, p]),
            mismatches: self.mirror_mismatches.with_label_values(&[service]),
        }
    }

    /// Registers the fleet-mode series (SPEC §11); called once, at start,
    /// only with `[state] backend = "etcd"` (a single replica shows none).
    pub(crate) fn fleet(&self) -> FleetMetrics {
        let gauge = |name: &str, help: &str| {
            let g = must(prometheus::Gauge::new(name, help));
            must(self.registry.register(Box::new(g.clone())));
            g
        };
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = must(IntCounterVec::new(Opts::new(name, help), labels));
            must(self.registry.register(Box::new(c.clone())));
            c
        };
        let resyncs = counter(
            "switchyard_state_resyncs_total",
            "Full re-reads of the shared state, by reason: compacted (the watch fell behind etcd's compaction), restored (etcd's revision went back or its cluster changed).",
            &["reason"],
        );
        for r in ["compacted", "restored"] {
            resyncs.with_label_values(&[r]);
        }
        let rejected = counter(
            "switchyard_state_rejected_values_total",
            "Values in the state store refused (invalid, or not newer than the state served); the previous state was kept.",
            &["service"],
        );
        FleetMetrics {
            connected: gauge(
                "switchyard_state_backend_connected",
                "1 while the replica hears from the state store (etcd), else 0.",
            ),
            staleness: gauge(
                "switchyard_state_staleness_seconds",
                "Seconds since the replica last heard from the state store; 0 while connected.",
            ),
            resyncs,
            rejected,
        }
    }

    /// The text exposition of every metric.
    pub(crate) fn render(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(16 * 1024);
        // Encoding into a Vec cannot fail for well-formed metrics.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        buf
    }

    /// Counts a request no service matched (or refused before routing).
    pub(crate) fn observe_unmatched(&self, status: u16) {
        self.unmatched[code_index(status)].inc();
    }

    /// Handles for one pool of one service.
    pub fn pool(&self, service: &str, color: Color) -> PoolMetrics {
        let pool = color.as_str();
        PoolMetrics {
            requests: CODES.map(|class| self.requests.with_label_values(&[service, pool, class])),
            duration: self.duration.with_label_values(&[service, pool]),
            upstream_errors: UpstreamErrorKind::ALL.map(|k| {
                self.upstream_errors
                    .with_label_values(&[service, pool, k.as_str()])
            }),
            failovers_from: self.failovers.with_label_values(&[service, pool]),
            outcomes: self.outcomes(service),
            color,
            retries: self.retries.with_label_values(&[service, pool]),
            ejections: self.ejections.with_label_values(&[service, pool]),
        }
    }

    /// `switchyard_backend_healthy` handle for one backend.
    pub fn backend_healthy(&self, service: &str, color: Color, backend: &str) -> IntGauge {
        self.backend_healthy
            .with_label_values(&[service, color.as_str(), backend])
    }

    /// Drops the series of a backend that left its pool.
    pub(crate) fn forget_backend(&self, service: &str, color: Color, backend: &str) {
        let _ = self
            .backend_healthy
            .remove_label_values(&[service, color.as_str(), backend]);
    }

    /// Sets `switchyard_pool_weight` for both pools of a service.
    ///
    /// Also creates the service's `switchyard_routing_changes_total` series
    /// at 0: a counter series that first appears at 1 shows no `increase()`
    /// or `changes()` in Prometheus, so the first switch after a start
    /// would be invisible to dashboards and alerts.
    pub(crate) fn set_weights(&self, service: &str, weights: crate::weights::Weights) {
        for c in Color::ALL {
            self.pool_weight
                .with_label_values(&[service, c.as_str()])
                .set(weights.percent(c));
        }
        for action in ROUTING_ACTIONS {
            self.routing_changes.with_label_values(&[service, action]);
        }
    }

    /// Counts an accepted routing change.
    pub(crate) fn routing_change(&self, service: &str, action: &str) {
        self.routing_changes
            .with_label_values(&[service, action])
            .inc();
    }

    /// Counts a reload.
    pub(crate) fn config_reload(&self, ok: bool) {
        self.config_reloads
            .with_label_values(&[if ok { "ok" } else { "error" }])
            .inc();
    }

    /// The match counter of one rule (looked up when a snapshot is built,
    /// not per request).
    pub fn rule_matches(&self, service: &str, rule: &str) -> IntCounter {
        self.rule_matches.with_label_values(&[service, rule])
    }

    /// Drops the match counter of a rule that is gone.
    pub(crate) fn forget_rule(&self, service: &str, rule: &str) {
        let _ = self.rule_matches.remove_label_values(&[service, rule]);
    }

    /// Drops every series of a service that left the config.
    pub(crate) fn forget_service(&self, service: &str) {
        for c in Color::ALL {
            let pool = c.as_str();
            for class in CODES {
                let _ = self.requests.remove_label_values(&[service, pool, class]);
            }
            let _ = self.duration.remove_label_values(&[service, pool]);
            for k in UpstreamErrorKind::ALL {
                let _ = self
                    .upstream_errors
                    .remove_label_values(&[service, pool, k.as_str()]);
            }
            let _ = self.pool_weight.remove_label_values(&[service, pool]);
            let _ = self.failovers.remove_label_values(&[service, pool]);
            let _ = self.retries.remove_label_values(&[service, pool]);
            let _ = self.ejections.remove_label_values(&[service, pool]);
        }
        for action in ROUTING_ACTIONS {
            let _ = self.routing_changes.remove_label_values(&[service, action]);
        }
        for c in Color::ALL {
            for code in MIRROR_CODES {
                let _ = self
                    .mirror_requests
                    .remove_label_values(&[service, c.as_str(), code]);
            }
            let _ = self
                .mirror_duration
                .remove_label_values(&[service, c.as_str()]);
        }
        for d in crate::data_plane::mirror::Dropped::ALL {
            let _ = self
                .mirror_dropped
                .remove_label_values(&[service, d.label()]);
        }
        let _ = self.mirror_mismatches.remove_label_values(&[service]);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Pre-resolved metric handles of one pool of one service.
pub struct PoolMetrics {
    requests: [IntCounter; 6],
    duration: Histogram,
    upstream_errors: [IntCounter; 6],
    /// Failovers away from this pool.
    pub(crate) failovers_from: IntCounter,
    /// Retries within this pool.
    pub(crate) retries: IntCounter,
    /// Ejections of this pool's backends.
    pub(crate) ejections: IntCounter,
    /// The service's outcome counters (rollout analysis).
    outcomes: Arc<ServiceOutcomes>,
    /// Which pool these handles are for.
    color: Color,
}

impl PoolMetrics {
    /// Counts one answered request.
    #[inline]
    pub(crate) fn observe(&self, status: u16, seconds: f64) {
        self.requests[code_index(status)].inc();
        self.duration.observe(seconds);
    }

    /// Counts one request's outcome for the rollout analysis: relaxed
    /// atomic adds, no lock, no allocation.
    #[inline]
    pub(crate) fn outcome(&self, outcome: Outcome, elapsed: std::time::Duration) {
        self.outcomes.pool(self.color).record(outcome, elapsed);
    }

    /// Requests answered so far and how many of them were 5xx: read once
    /// a second by the admin page's sampler, never on the request path.
    pub(crate) fn answered(&self) -> (u64, u64) {
        let total = self.requests.iter().map(IntCounter::get).sum();
        (total, self.requests[4].get())
    }

    /// Counts one upstream error.
    #[inline]
    pub(crate) fn upstream_error(&self, kind: UpstreamErrorKind) {
        let i = match kind {
            UpstreamErrorKind::Connect => 0,
            UpstreamErrorKind::Timeout => 1,
            UpstreamErrorKind::Reset => 2,
            UpstreamErrorKind::Tls => 3,
            UpstreamErrorKind::Truncated => 4,
            UpstreamErrorKind::HeadTooLarge => 5,
        };
        self.upstream_errors[i].inc();
    }
}

/// Pre-resolved metric handles of one service's mirror (SPEC §9).
pub(crate) struct MirrorMetrics {
    /// By [`MIRROR_CODES`].
    pub(crate) requests: [IntCounter; 7],
    /// By `data_plane::mirror::Dropped` order.
    pub(crate) dropped: [IntCounter; 4],
    /// Copy durations.
    pub(crate) duration: Histogram,
    /// Status-class mismatches.
    pub(crate) mismatches: IntCounter,
}
