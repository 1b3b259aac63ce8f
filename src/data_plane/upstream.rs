//! Sending a request upstream: the attempt loop (which backend, retries
//! within the retry budget, replays), and the passive-ejection policy that
//! judges backends by what real requests see.
//!
//! The decisions are in [`Attempts`], a small value with no IO, tested
//! below without sockets; [`send`] does the IO and asks it after each
//! failed attempt. Whether an error blames the backend or may be retried
//! is a property of the error ([`ProxyError::blames_backend`],
//! [`ProxyError::is_retryable`]).

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};

use crate::color::Color;
use crate::data_plane::backend::{now_ms, Backend, ClientWaits, UpstreamBody};
use crate::data_plane::error::ProxyError;
use crate::data_plane::exchange::{pool_header, BodyError, BodyFailure, Exchange};
use crate::data_plane::h1client::{HeadTimer, ResponseBody, UpstreamConn};
use crate::data_plane::headers::X_SWITCHYARD_POOL;
use crate::data_plane::routing::{pick_backend, Pool, PoolChoice, Route, Settings};

/// Attempts per request.
pub(crate) const MAX_ATTEMPTS: usize = 3;

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    /// Send the same request again: it never reached the backend.
    Retry,
    /// Send the held copy of the request again (idempotent, replayable).
    Replay,
    /// Answer the client with the error.
    GiveUp,
}

/// How an attempt failed, as far as the next one is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failed {
    /// Could not connect.
    Connect,
    /// The connection died before the request went out: nothing reached
    /// the backend. `reused`: it was a pooled connection.
    Unsent {
        /// Was it a pooled connection?
        reused: bool,
    },
    /// The request went out and the exchange failed; `retryable` as
    /// [`ProxyError::is_retryable`] says.
    Sent {
        /// Could sending it again help?
        retryable: bool,
    },
}

/// The attempts of one request: how many were made, which backends are
/// excluded from the next pick, whether the request was replayed.
#[derive(Debug)]
pub(crate) struct Attempts {
    /// Backends tried (by `Arc` address), excluded from later picks.
    tried: [usize; MAX_ATTEMPTS],
    n_tried: usize,
    made: usize,
    /// Is a copy of the request held (idempotent, small body)?
    can_replay: bool,
    replayed: bool,
}

impl Attempts {
    /// No attempt yet; `can_replay` when a copy of the request is held.
    pub(crate) fn new(can_replay: bool) -> Attempts {
        Attempts {
            tried: [0; MAX_ATTEMPTS],
            n_tried: 0,
            made: 0,
            can_replay,
            replayed: false,
        }
    }

    /// Backends not to pick again.
    pub(crate) fn excluded(&self) -> &[usize] {
        &self.tried[..self.n_tried]
    }

    /// Counts an attempt about to be made.
    pub(crate) fn begin(&mut self) {
        self.made += 1;
    }

    fn exclude(&mut self, backend: &Backend) {
        if self.n_tried < MAX_ATTEMPTS {
            self.tried[self.n_tried] = std::ptr::from_ref(backend) as usize;
            self.n_tried += 1;
        }
    }

    /// Decides after an attempt on `backend` failed. `spend` takes one retry
    /// from the service's budget; `others_left` says whether the pool has a
    /// backend outside the excluded set.
    ///
    /// - a connect failure is retried (elsewhere) within the budget;
    /// - a request that never went out is sent again, to another backend
    ///   unless only a stale pooled connection failed (no budget: nothing
    ///   reached a backend);
    /// - a request that went out is replayed once, within the budget, if
    ///   the error is retryable and a copy is held: elsewhere if the pool
    ///   has another backend, else on a fresh connection to the same one;
    /// - never more than [`MAX_ATTEMPTS`] attempts.
    pub(crate) fn after_failure(
        &mut self,
        backend: &Backend,
        failed: Failed,
        spend: impl FnOnce() -> bool,
        others_left: impl FnOnce(&[usize]) -> bool,
    ) -> Next {
        let more = self.made < MAX_ATTEMPTS;
        match failed {
            Failed::Connect => {
                if more && spend() {
                    self.exclude(backend);
                    Next::Retry
                } else {
                    Next::GiveUp
                }
            }
            Failed::Unsent { reused } => {
                if !reused {
                    self.exclude(backend);
                }
                if more {
                    Next::Retry
                } else {
                    Next::GiveUp
                }
            }
            Failed::Sent { retryable } => {
                if !(retryable && self.can_replay && !self.replayed && more && spend()) {
                    return Next::GiveUp;
                }
                self.replayed = true;
                self.exclude(backend);
                if !others_left(self.excluded()) {
                    // No other backend: a fresh connection to this one.
                    self.n_tried -= 1;
                }
                Next::Replay
            }
        }
    }
}

/// Sends `req` to a backend of the chosen pool and waits for the response
/// head, with the retries [`Attempts`] allows. Retries stay in the pool the
/// request was routed to (after a failover, the other one). Timeouts are
/// never retried. `replayable`: the request is idempotent and its body is
/// held in memory, so it may be sent again after it went out
/// ([`UpstreamConn::send`] leaves such a request intact).
///
/// The backend is returned borrowed from `route`: the request holds its
/// snapshot anyway, and a clone of the `Arc` would write a count that
/// every worker writes (the in-flight guard holds the one clone).
pub(crate) async fn send<'r>(
    route: &'r Route,
    settings: &Settings,
    choice: &mut PoolChoice,
    mut req: Request<UpstreamBody>,
    replayable: bool,
    ex: &mut Exchange,
) -> Result<(Response<ResponseBody>, UpstreamConn, &'r Arc<Backend>), ProxyError> {
    let svc = &route.service;
    let mut attempts = Attempts::new(replayable);
    let mut last_err = None;
    loop {
        let picked = if attempts.made == 0 {
            pick_backend(route, choice, &[]).map(|p| {
                if let Some(from) = p.failover_from {
                    svc.pool_metrics(from).failovers_from.inc();
                }
                p.backend
            })
        } else {
            route
                .pool(choice.color)
                .pick(svc.balance, now_ms(), attempts.excluded())
        };
        let Some(backend) = picked else {
            return Err(last_err.unwrap_or(ProxyError::NoHealthyBackend(choice.color)));
        };
        ex.choice = Some(*choice);
        ex.in_flight = Some(backend.start_request());
        req.headers_mut()
            .insert(X_SWITCHYARD_POOL.clone(), pool_header(choice.color));
        attempts.begin();

        let (err, failed) = match backend
            .checkout(settings.connect_timeout, settings.max_response_headers)
            .await
        {
            Err(source) => {
                let err = ProxyError::Connect {
                    backend: backend.label.clone(),
                    source,
                };
                (err, Failed::Connect)
            }
            Ok((mut conn, reused)) => {
                let waits = req.body().client_waits();
                // Out of `conn` while `send` borrows it; back in below.
                let mut timer = std::mem::take(&mut conn.head_timer);
                let sent = tokio::select! {
                    biased;
                    r = conn.send(&mut req) => Ok(r),
                    () = head_deadline(settings.request_timeout, waits, &mut timer) => Err(()),
                };
                conn.head_timer = timer;
                let failed = match sent {
                    Ok(Ok(resp)) => return Ok((resp, conn, backend)),
                    Ok(Err(failed)) => failed,
                    Err(()) => {
                        let err = ProxyError::Timeout {
                            backend: backend.label.clone(),
                            timeout: settings.request_timeout,
                        };
                        upstream_error(route, backend, choice.color, &err);
                        return Err(err);
                    }
                };
                let (unsent, source) = (failed.unsent, failed.error);
                if !unsent && source.is_user() {
                    // The client's body broke (malformed chunk, client gone
                    // mid-upload): not the backend's fault.
                    return Err(ProxyError::BadRequest(
                        "malformed or incomplete request body",
                    ));
                }
                if !unsent && source.is_head_too_large() {
                    // Too many header fields: the backend is not sick, and
                    // the same request would get the same head.
                    let err = ProxyError::HeadTooLarge {
                        backend: backend.label.clone(),
                        source,
                    };
                    upstream_error(route, backend, choice.color, &err);
                    return Err(err);
                }
                let reset = unsent || source.is_reset();
                let err = ProxyError::Upstream {
                    backend: backend.label.clone(),
                    source,
                    reset,
                    stale: reused && reset,
                };
                if unsent {
                    (err, Failed::Unsent { reused })
                } else {
                    // Only a replay can follow, of the request left intact
                    // (a streamed body is gone, and is never replayed).
                    let retryable = err.is_retryable();
                    (err, Failed::Sent { retryable })
                }
            }
        };
        upstream_error(route, backend, choice.color, &err);
        let pool = route.pool(choice.color);
        let next = attempts.after_failure(
            backend,
            failed,
            || svc.retry_budget.try_spend(),
            |excluded| pool.pick(svc.balance, now_ms(), excluded).is_some(),
        );
        match next {
            Next::Retry | Next::Replay => {}
            Next::GiveUp => return Err(err),
        }
        svc.pool_metrics(choice.color).retries.inc();
        last_err = Some(err);
    }
}

/// Resolves when the backend has had `limit` to answer, not counting the
/// time the request body spent waiting on the client: a slow upload never
/// makes the backend time out (the client's own silence is bounded in
/// [`UpstreamBody::streamed`]). `timer`: the upstream connection's own,
/// re-armed here ([`HeadTimer`]).
async fn head_deadline(limit: Duration, waits: Option<Arc<ClientWaits>>, timer: &mut HeadTimer) {
    let start = tokio::time::Instant::now();
    let mut sleep = timer.arm(start + limit);
    loop {
        sleep.as_mut().await;
        let Some(w) = &waits else { return };
        let due = start + limit + w.total();
        if due <= tokio::time::Instant::now() {
            return;
        }
        sleep.as_mut().reset(due);
    }
}

/// Records an upstream error (`switchyard_upstream_errors_total`), and, if
/// it blames the backend, a failure towards its passive ejection.
pub(crate) fn upstream_error(
    route: &Route,
    backend: &Arc<Backend>,
    color: Color,
    err: &ProxyError,
) {
    if let Some(kind) = err.upstream_kind() {
        route.service.pool_metrics(color).upstream_error(kind);
    }
    if err.blames_backend() {
        record_failure(route, backend, color);
    }
}

/// An upstream response body failed after its head went to the client
/// (an [`crate::data_plane::exchange::OnBodyFailure`]): counts it
/// (`truncated` or `timeout`), blames the backend once, and returns the
/// error the client's body ends with.
pub(crate) fn body_failed(
    route: &Route,
    backend: &Arc<Backend>,
    color: Color,
    failure: BodyFailure,
) -> BodyError {
    let err = match failure {
        // The client's own upload broke while the response streamed (full
        // duplex): the exchange ends, and the backend is not to blame.
        BodyFailure::Broke(source) if source.is_user() => {
            tracing::debug!(service = %route.service.name, error = %source, "request body failed");
            return Box::new(source);
        }
        BodyFailure::Broke(source) => ProxyError::Truncated {
            backend: backend.label.clone(),
            source,
        },
        BodyFailure::Silent(timeout) => ProxyError::ReadTimeout {
            backend: backend.label.clone(),
            timeout,
        },
    };
    tracing::debug!(service = %route.service.name, error = %err, "response body failed");
    upstream_error(route, backend, color, &err);
    Box::new(err)
}

// Passive ejection, the whole policy: consecutive failures seen by real
// requests (connect errors, resets, timeouts, truncated bodies, 5xx) eject
// a backend for a back-off that doubles with each ejection. At most half of
// a pool can be ejected at once, so one blip cannot empty a pool (Envoy's
// `max_ejection_percent`). A checked backend returns through a passing
// check after its back-off, an unchecked one when the back-off ends.

/// Consecutive failures that eject a backend.
pub(crate) const EJECT_AFTER_FAILURES: u32 = 5;
/// First ejection length; doubles with each further ejection.
pub(crate) const EJECT_BASE: Duration = Duration::from_secs(5);
/// Longest ejection.
pub(crate) const EJECT_MAX: Duration = Duration::from_secs(300);
/// Largest share of a pool that may be ejected at once, in percent.
pub(crate) const MAX_EJECTED_PERCENT: usize = 50;

/// May `backend` be ejected from `pool`? Only if another backend of the
/// pool stays available and at most half the pool would be ejected: a blip
/// must never empty a pool (a pool of one is never passively ejected; its
/// active checks still judge it).
pub(crate) fn may_eject(pool: &Pool, backend: &Backend) -> bool {
    let now = now_ms();
    let n = pool.backends.len();
    let ejected = pool.backends.iter().filter(|b| b.is_ejected()).count();
    let others_available = pool
        .backends
        .iter()
        .any(|b| !std::ptr::eq(&**b, backend) && b.is_available(now));
    others_available && (ejected + 1) * 100 <= n * MAX_EJECTED_PERCENT
}

/// A backend a request succeeded with.
pub(crate) fn record_success(backend: &Backend) {
    backend.record_success();
}

/// Records a failed exchange with a backend (an error that blames it, or a
/// 5xx) towards its passive ejection; ejects it after
/// [`EJECT_AFTER_FAILURES`] in a row if [`may_eject`] allows.
pub(crate) fn record_failure(route: &Route, backend: &Arc<Backend>, color: Color) {
    let pool = route.pool(color);
    let ejected = backend.record_failure(EJECT_AFTER_FAILURES, EJECT_BASE, EJECT_MAX, || {
        may_eject(pool, backend)
    });
    if ejected {
        if backend.returns_by_itself() {
            // Without active checks nothing else would notice the end of
            // the back-off: set the gauge back then.
            let weak = Arc::downgrade(backend);
            let wait = Duration::from_millis(backend.ejected_for_ms());
            tokio::spawn(async move {
                tokio::time::sleep(wait).await;
                if let Some(b) = weak.upgrade() {
                    b.refresh_gauge();
                }
            });
        }
        route.service.pool_metrics(color).ejections.inc();
        tracing::warn!(
            service = %route.service.name,
            pool = %color,
            backend = %backend.label,
            "backend ejected after consecutive failures"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data_plane::backend::Health;

    fn backend(port: u16) -> Arc<Backend> {
        let m = crate::metrics::Metrics::new();
        let addr = crate::config::BackendAddr::parse(&format!("127.0.0.1:{port}")).expect("addr");
        let g = m.backend_healthy("t", Color::Blue, &addr.to_string());
        Arc::new(Backend::new(addr, None, Health::Healthy, false, g))
    }

    const YES: fn() -> bool = || true;
    const NO: fn() -> bool = || false;

    #[test]
    fn connect_failures_retry_elsewhere_within_budget_and_attempts() {
        let (a, b, c) = (backend(1), backend(2), backend(3));
        let mut at = Attempts::new(false);
        at.begin();
        assert_eq!(
            at.after_failure(&a, Failed::Connect, YES, |_| true),
            Next::Retry
        );
        assert_eq!(at.excluded(), [Arc::as_ptr(&a) as usize]);
        at.begin();
        assert_eq!(
            at.after_failure(&b, Failed::Connect, NO, |_| true),
            Next::GiveUp,
            "no budget"
        );
        let mut at = Attempts::new(false);
        for x in [&a, &b] {
            at.begin();
            assert_eq!(
                at.after_failure(x, Failed::Connect, YES, |_| true),
                Next::Retry
            );
        }
        at.begin();
        let spent = std::cell::Cell::new(false);
        let next = at.after_failure(
            &c,
            Failed::Connect,
            || {
                spent.set(true);
                true
            },
            |_| true,
        );
        assert_eq!(next, Next::GiveUp, "at most {MAX_ATTEMPTS} attempts");
        assert!(!spent.get(), "no budget spent on a retry not made");
    }

    #[test]
    fn unsent_requests_retry_without_budget_and_stale_conns_do_not_exclude() {
        let a = backend(1);
        let mut at = Attempts::new(false);
        at.begin();
        let next = at.after_failure(&a, Failed::Unsent { reused: true }, NO, |_| true);
        assert_eq!(
            next,
            Next::Retry,
            "nothing reached the backend: no budget needed"
        );
        assert!(
            at.excluded().is_empty(),
            "a stale pooled connection is not the backend's fault"
        );
        at.begin();
        let next = at.after_failure(&a, Failed::Unsent { reused: false }, NO, |_| true);
        assert_eq!(next, Next::Retry);
        assert_eq!(at.excluded().len(), 1);
        at.begin();
        let next = at.after_failure(&a, Failed::Unsent { reused: false }, NO, |_| true);
        assert_eq!(next, Next::GiveUp);
    }

    #[test]
    fn sent_requests_replay_once_only_if_retryable_held_and_budgeted() {
        let a = backend(1);
        for (retryable, held, budget) in [
            (false, true, true),
            (true, false, true),
            (true, true, false),
        ] {
            let mut at = Attempts::new(held);
            at.begin();
            let next = at.after_failure(&a, Failed::Sent { retryable }, || budget, |_| true);
            assert_eq!(next, Next::GiveUp, "{retryable} {held} {budget}");
        }
        let mut at = Attempts::new(true);
        at.begin();
        let next = at.after_failure(&a, Failed::Sent { retryable: true }, YES, |_| true);
        assert_eq!(next, Next::Replay);
        assert_eq!(at.excluded().len(), 1, "replayed elsewhere");
        at.begin();
        let next = at.after_failure(&a, Failed::Sent { retryable: true }, YES, |_| true);
        assert_eq!(next, Next::GiveUp, "only once");

        let mut at = Attempts::new(true);
        at.begin();
        let next = at.after_failure(&a, Failed::Sent { retryable: true }, YES, |_| false);
        assert_eq!(next, Next::Replay);
        assert!(
            at.excluded().is_empty(),
            "no other backend: the same one again"
        );
    }

    fn pool(n: u16) -> Pool {
        Pool::new((1..=n).map(backend).collect())
    }

    fn eject(pool: &Pool, i: usize) -> bool {
        let b = &pool.backends[i];
        (0..EJECT_AFTER_FAILURES).any(|_| {
            b.record_failure(EJECT_AFTER_FAILURES, EJECT_BASE, EJECT_MAX, || {
                may_eject(pool, b)
            })
        })
    }

    #[test]
    fn ejection_never_empties_a_pool() {
        let one = pool(1);
        assert!(!eject(&one, 0), "a pool of one is never passively ejected");
        let two = pool(2);
        assert!(eject(&two, 0));
        assert!(!eject(&two, 1), "the last available backend stays");
        let four = pool(4);
        assert!(eject(&four, 0));
        assert!(eject(&four, 1));
        assert!(!eject(&four, 2), "at most half the pool");
        assert!(four.backends[0].is_ejected() && !four.backends[2].is_ejected());
    }
}
