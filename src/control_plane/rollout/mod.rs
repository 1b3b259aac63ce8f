//! Progressive rollouts (SPEC §10): the plan ([`plan`]), the analysis
//! ([`analysis`]) and the state machine ([`machine`]) are pure code; this
//! module is the per-service driver task that runs them.
//!
//! One task per service with a running rollout is the only writer of its
//! rollout state. Every [`TICK`] it reads the service's outcome counters
//! (`data_plane::outcomes`, bumped by the request path with relaxed atomic
//! adds), feeds the differences to the analysis, ticks the state machine,
//! and applies what the machine wants through [`Control::commit_rollout`]:
//! a weight change is an ordinary generation (persisted, history actor
//! `rollout:<id>`, published); otherwise the rollout record alone is
//! persisted with the routing state (on every transition, and every
//! [`PERSIST_EVERY`] while it observes, so that a restart resumes the same
//! step with the time it had left). Operator verbs reach the task through a
//! channel, so they never race the tick.
//!
//! Fleet mode: the record names the replica whose driver runs it
//! (`driver`); [`takeover`] resumes it on that replica after a restart,
//! and on another replica when that one is gone. A driver that finds its
//! record claimed by another replica stops without writing.

pub(crate) mod analysis;
pub(crate) mod machine;
pub(crate) mod plan;
pub(crate) mod takeover;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde_json::Value;
use tokio::sync::{mpsc, oneshot, watch};

use crate::color::Color;
use crate::config::mirror::MirrorSpec;
use crate::control_plane::control::{Control, ControlError};
use crate::control_plane::state::{ChangeMeta, Command};
use crate::data_plane::mirror::OutcomeCounts;
use crate::data_plane::outcomes::PoolCounts;
use crate::weights::Live;

use analysis::{Tally, Verdict};
use machine::{weights_for, Reaction, Rollout, State, VerbError};
use plan::Plan;

/// How often the driver reads the counters and ticks the machine.
pub(crate) const TICK: Duration = Duration::from_millis(250);
/// Trailing window of the absolute guard, in seconds.
pub(crate) const GUARD_WINDOW_S: u64 = 10;
/// How often the record is persisted while nothing else changes.
pub(crate) const PERSIST_EVERY: Duration = Duration::from_secs(2);
/// How long the driver keeps counting the canary's user failures after the
/// rollout ended (requests that were in flight at the rollback).
pub(crate) const LINGER: Duration = Duration::from_secs(3);
/// Past rollouts kept per service.
pub(crate) const ROLLOUTS_LIMIT: usize = 50;

// ===== mirror hook =====

/// A mirror step starts: copy `percent` % of the live pool's requests to
/// `pool` (the canary), as an ordinary `mirror` change by `rollout:<id>`.
async fn set_mirror(control: &Control, r: &Rollout, percent: f64) {
    // The plan checked 0 < percent <= 100; hundredths of a percent.
    let bp = (percent * 100.0).round().clamp(1.0, 10_000.0) as u16;
    let cmd = Command::SetMirror {
        mirror: Some(MirrorSpec::new(r.canary, bp)),
    };
    let meta = rollout_meta(r, None, "mirror step");
    if let Err(e) = control.execute(&r.service, cmd, meta).await {
        tracing::error!(service = %r.service, id = %r.id, error = %e, "rollout: could not start mirroring");
    }
}

/// The mirror step is over (or the rollout ended): stop the copies.
async fn clear_mirror(control: &Control, r: &Rollout) {
    let cmd = Command::SetMirror { mirror: None };
    let meta = rollout_meta(r, None, "mirror step over");
    if let Err(e) = control.execute(&r.service, cmd, meta).await {
        tracing::error!(service = %r.service, id = %r.id, error = %e, "rollout: could not stop mirroring");
    }
}

// ===== errors =====

/// Why a rollout call was refused. Nothing changed in every case.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RolloutError {
    /// No such service.
    #[error("unknown service `{0}`")]
    UnknownService(String),
    /// A rollout already runs (or a manual change was tried during one).
    #[error("rollout {0} is running; pause, promote or abort it first")]
    Active(String),
    /// The service never had a rollout.
    #[error("service `{0}` has no rollout")]
    NoRollout(String),
    /// The verb does not apply in the rollout's state.
    #[error(transparent)]
    Verb(#[from] VerbError),
    /// The canary pool cannot take traffic.
    #[error("canary pool {0} has no healthy backend")]
    NoHealthyBackend(Color),
    /// A split is in effect: there is no one live pool to start from.
    #[error("traffic is split ({0}); a rollout starts from one pool live at 100 %")]
    Split(String),
    /// `plan` names no `[[rollout_plan]]`.
    #[error("plan: no [[rollout_plan]] named {0:?} in the config")]
    UnknownPlan(String),
    /// The inline plan is invalid.
    #[error("plan: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    BadPlan(Vec<plan::PlanError>),
    /// `If-Match` is stale.
    #[error("generation is {current}, not {expected} (If-Match)")]
    Stale {
        /// What the caller expected.
        expected: u64,
        /// What it is.
        current: u64,
    },
    /// The change could not be made (persisting failed, …).
    #[error(transparent)]
    Control(#[from] ControlError),
    /// The driver task is gone (shutting down).
    #[error("the rollout driver of `{0}` stopped")]
    DriverGone(String),
}

// ===== the registry of drivers =====

/// An operator verb.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Verb {
    /// Stop progress; analysis continues.
    Pause,
    /// Continue after a pause.
    Resume,
    /// Next step (`full`: straight to 100 %).
    Promote {
        /// Straight to 100 %.
        full: bool,
    },
    /// Canary to 0 %.
    Abort {
        /// Why (e.g. `manual_override`).
        why: String,
    },
}

impl Verb {
    fn name(&self) -> &'static str {
        match self {
            Verb::Pause => "pause",
            Verb::Resume => "resume",
            Verb::Promote { .. } => "promote",
            Verb::Abort { .. } => "abort",
        }
    }
}

type VerbReply = oneshot::Sender<Result<Value, RolloutError>>;
type VerbSender = mpsc::Sender<(Verb, ChangeMeta, VerbReply)>;

struct Handle {
    verbs: VerbSender,
    latest: watch::Receiver<Arc<Rollout>>,
}

/// The running drivers, by service. Owned by [`Control`].
#[derive(Default)]
pub(crate) struct Drivers {
    running: Mutex<HashMap<String, Handle>>,
}

impl Drivers {
    fn handle(&self, service: &str) -> Option<(VerbSender, watch::Receiver<Arc<Rollout>>)> {
        let map = self.running.lock().unwrap_or_else(|e| e.into_inner());
        map.get(service)
            .map(|h| (h.verbs.clone(), h.latest.clone()))
    }

    /// Installs `handle` unless a driver of the same rollout already runs
    /// here (a start and a takeover look racing); returns whether it did.
    fn insert(&self, service: &str, handle: Handle) -> bool {
        let mut map = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let id = handle.latest.borrow().id.clone();
        if map.get(service).is_some_and(|h| h.latest.borrow().id == id) {
            return false;
        }
        map.insert(service.to_string(), handle);
        true
    }

    /// Does the driver of rollout `id` of `service` run on this replica?
    fn runs(&self, service: &str, id: &str) -> bool {
        let map = self.running.lock().unwrap_or_else(|e| e.into_inner());
        map.get(service).is_some_and(|h| h.latest.borrow().id == id)
    }

    fn remove(&self, service: &str, id: &str) {
        let mut map = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if map.get(service).is_some_and(|h| h.latest.borrow().id == id) {
            map.remove(service);
        }
    }
}

fn now_text() -> String {
    time_text(SystemTime::now())
}

fn time_text(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// `later` − `earlier` in ms (0 if the clock went back).
fn ms_between(earlier: SystemTime, later: SystemTime) -> f64 {
    later
        .duration_since(earlier)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// Starts a rollout of `service` with `plan`: validates, applies the first
/// step (one generation), persists, and spawns its driver.
pub(crate) async fn start(
    control: &Arc<Control>,
    service: &str,
    plan: Plan,
    meta: ChangeMeta,
) -> Result<Value, RolloutError> {
    let (weights, generation, last) = control
        .rollout_facts(service)
        .await
        .ok_or_else(|| RolloutError::UnknownService(service.to_string()))?;
    if let Some(r) = last.filter(|r| r.is_active()) {
        return Err(RolloutError::Active(r.id.clone()));
    }
    if let Some(expected) = meta.if_match.filter(|e| *e != generation) {
        return Err(RolloutError::Stale {
            expected,
            current: generation,
        });
    }
    let baseline = match weights.live() {
        Live::Full(c) => c,
        Live::Split => return Err(RolloutError::Split(weights.to_string())),
    };
    let canary = baseline.other();
    if !control.pool_has_healthy(service, canary) {
        return Err(RolloutError::NoHealthyBackend(canary));
    }
    let unix_ms = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let id = format!("{service}-{unix_ms}");
    let at = now_text();
    let mut record = Rollout::start(id, service.to_string(), plan, canary, &at);
    if let Some(f) = control.fleet() {
        record.set_driver(f.replica_id(), &at);
    }
    tracing::info!(service, id = %record.id, %canary, started_by = %meta.actor, "rollout started");
    let meta = rollout_meta(
        &record,
        meta.reason.as_deref(),
        &format!("started by {}", meta.actor),
    );
    control
        .commit_rollout(
            service,
            record.clone(),
            Some(weights_for(canary, record.weight_bp)),
            &meta,
        )
        .await?;
    control
        .metrics()
        .rollout_set(service, record.state.as_str(), record.step);
    if record.state.is_terminal() {
        control
            .metrics()
            .rollout_ended(service, record.state.as_str());
        return Ok(record.view(false));
    }
    let view = record.view(false);
    spawn(control, record);
    Ok(view)
}

/// Resumes the driver of every service whose persisted rollout was running
/// (after a restart): the same step, with the time it had left. Fleet
/// mode: starts [`takeover::watch`] instead, which resumes the rollouts
/// this replica drove once etcd has confirmed it still does, and takes
/// over those whose driver is gone.
pub(crate) async fn resume_all(control: &Arc<Control>) {
    if control.fleet().is_some() {
        takeover::watch(control);
        return;
    }
    for record in control.active_rollouts().await {
        tracing::info!(service = %record.service, id = %record.id, step = record.step,
            remaining_s = record.step_remaining_s().unwrap_or(0.0), "rollout resumed after restart");
        control
            .metrics()
            .rollout_set(&record.service, record.state.as_str(), record.step);
        spawn(control, record);
    }
}

/// Applies an operator verb to the running rollout of `service`.
pub(crate) async fn verb(
    control: &Arc<Control>,
    service: &str,
    verb: Verb,
    meta: ChangeMeta,
) -> Result<Value, RolloutError> {
    let Some((tx, _)) = control.drivers().handle(service) else {
        return match control.rollout_facts(service).await {
            None => Err(RolloutError::UnknownService(service.to_string())),
            Some((_, _, None)) => Err(RolloutError::NoRollout(service.to_string())),
            Some((_, _, Some(r))) if r.is_active() => {
                let me = control.fleet().map(|f| f.replica_id());
                Err(RolloutError::Verb(VerbError(match r.driver.as_deref() {
                    // Fleet mode: another replica drives it.
                    Some(d) if Some(d) != me => format!(
                        "rollout {} is driven by replica {d}: send the verb to that replica",
                        r.id
                    ),
                    // Its driver here is starting (or resuming it after a
                    // restart or a takeover).
                    _ => format!(
                        "rollout {} is being resumed by this replica: retry in a moment",
                        r.id
                    ),
                })))
            }
            Some((_, _, Some(r))) => Err(RolloutError::Verb(VerbError(format!(
                "rollout {} already ended ({})",
                r.id,
                r.state.as_str()
            )))),
        };
    };
    let (reply, rx) = oneshot::channel();
    tx.send((verb, meta, reply))
        .await
        .map_err(|_| RolloutError::DriverGone(service.to_string()))?;
    rx.await
        .map_err(|_| RolloutError::DriverGone(service.to_string()))?
}

/// Is a rollout of `service` running now?
pub(crate) async fn active_id(control: &Control, service: &str) -> Option<String> {
    if let Some((_, latest)) = control.drivers().handle(service) {
        let r = latest.borrow();
        if r.is_active() {
            return Some(r.id.clone());
        }
    }
    control
        .rollout_facts(service)
        .await
        .and_then(|(_, _, r)| r.filter(|r| r.is_active()).map(|r| r.id))
}

/// The current (or last) rollout object; with `wait`, answers when it ends
/// or `wait` has passed.
pub(crate) async fn current(
    control: &Control,
    service: &str,
    wait: Option<Duration>,
) -> Result<Value, RolloutError> {
    if let (Some(limit), Some((_, mut latest))) = (wait, control.drivers().handle(service)) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if !latest.borrow().is_active() {
                break;
            }
            match tokio::time::timeout_at(deadline, latest.changed()).await {
                Ok(Ok(())) => {}
                // Timed out, or the driver ended (its last record is persisted).
                Ok(Err(_)) | Err(_) => break,
            }
        }
        let r = Arc::clone(&latest.borrow());
        return Ok(r.view(true));
    }
    if let Some((_, latest)) = control.drivers().handle(service) {
        let r = Arc::clone(&latest.borrow());
        return Ok(r.view(true));
    }
    match control.rollout_facts(service).await {
        None => Err(RolloutError::UnknownService(service.to_string())),
        Some((_, _, None)) => Err(RolloutError::NoRollout(service.to_string())),
        Some((_, _, Some(r))) => Ok(r.view(true)),
    }
}

/// Past rollouts, newest first, each with its report.
pub(crate) async fn history(control: &Control, service: &str) -> Result<Value, RolloutError> {
    let mut list = control
        .rollouts(service)
        .await
        .ok_or_else(|| RolloutError::UnknownService(service.to_string()))?;
    // The running one as its driver sees it now.
    if let Some((_, latest)) = control.drivers().handle(service) {
        let r = Arc::clone(&latest.borrow());
        if let Some(slot) = list.iter_mut().find(|x| x.id == r.id) {
            *slot = (*r).clone();
        }
    }
    Ok(Value::Array(
        list.iter().rev().map(|r| r.view(true)).collect(),
    ))
}

fn rollout_meta(r: &Rollout, reason: Option<&str>, what: &str) -> ChangeMeta {
    let mut text = format!("rollout {} step {}: {what}", r.id, r.step);
    if let Some(extra) = reason {
        text.push_str(" — ");
        text.push_str(extra);
    }
    ChangeMeta {
        actor: format!("rollout:{}", r.id),
        reason: Some(text),
        at: SystemTime::now(),
        if_match: None,
    }
}

/// Spawns the driver of `record` unless one of the same rollout already
/// runs here; returns whether it did.
fn spawn(control: &Arc<Control>, record: Rollout) -> bool {
    let (verbs, rx) = mpsc::channel(16);
    let (latest_tx, latest) = watch::channel(Arc::new(record.clone()));
    if !control
        .drivers()
        .insert(&record.service, Handle { verbs, latest })
    {
        return false;
    }
    let control = Arc::clone(control);
    tokio::spawn(async move {
        let service = record.service.clone();
        let id = record.id.clone();
        Driver::new(Arc::clone(&control), record, latest_tx)
            .run(rx)
            .await;
        control.drivers().remove(&service, &id);
    });
    true
}

// ===== the driver task =====

struct Driver {
    control: Arc<Control>,
    r: Rollout,
    latest: watch::Sender<Arc<Rollout>>,
    last: [PoolCounts; 2],
    /// When `last` was read (the start of the next tick's evidence).
    last_read_at: SystemTime,
    /// The reading before the first one whose counts are in the error
    /// test's pending batch (`last_read_at` when none is pending).
    batch_from: SystemTime,
    /// Latency histograms of the current step, per pool.
    step_lat: [PoolCounts; 2],
    /// Per-tick tallies (canary, baseline) of the guard window.
    window: VecDeque<(Tally, Tally)>,
    /// The canary weight last applied (basis points).
    applied_bp: u16,
    mirror_on: bool,
    /// The canary's mirror counters at the last tick (mirror steps).
    last_mirror: Option<OutcomeCounts>,
    last_persist: tokio::time::Instant,
    verdict: Verdict,
}

impl Driver {
    fn new(control: Arc<Control>, r: Rollout, latest: watch::Sender<Arc<Rollout>>) -> Driver {
        let outcomes = control.metrics().outcomes(&r.service);
        let last = [
            outcomes.pool(Color::Blue).read(),
            outcomes.pool(Color::Green).read(),
        ];
        let applied_bp = r.weight_bp;
        Driver {
            control,
            r,
            latest,
            last,
            last_read_at: SystemTime::now(),
            batch_from: SystemTime::now(),
            step_lat: [PoolCounts::default(), PoolCounts::default()],
            window: VecDeque::new(),
            applied_bp,
            mirror_on: false,
            last_mirror: None,
            last_persist: tokio::time::Instant::now(),
            verdict: Verdict::Pass,
        }
    }

    async fn run(mut self, mut verbs: mpsc::Receiver<(Verb, ChangeMeta, VerbReply)>) {
        let mut interval = tokio::time::interval(TICK);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_tick = tokio::time::Instant::now();
        let mut ended_at: Option<tokio::time::Instant> = None;
        if self.taken_over().await {
            return;
        }
        self.sync_mirror().await;
        loop {
            tokio::select! {
                _ = interval.tick() => {
                    let now = tokio::time::Instant::now();
                    let dt = now.duration_since(last_tick);
                    last_tick = now;
                    if !self.control.has_service(&self.r.service).await {
                        tracing::warn!(service = %self.r.service, id = %self.r.id, "rollout stopped: the service left the config");
                        return;
                    }
                    if self.taken_over().await {
                        return;
                    }
                    self.tick(dt).await;
                    self.sync_mirror().await;
                    if !self.r.is_active() {
                        let since = *ended_at.get_or_insert(now);
                        if now.duration_since(since) >= LINGER {
                            self.persist(None, "final counts").await;
                            return;
                        }
                    }
                }
                msg = verbs.recv() => {
                    let Some((verb, meta, reply)) = msg else { return };
                    let result = self.verb(verb, meta).await;
                    self.sync_mirror().await;
                    let _ = reply.send(result);
                }
            }
        }
    }

    /// Fleet mode: has another replica claimed the rollout (this one was
    /// cut off from etcd long enough for its presence to expire)? Then
    /// this driver stops, without writing: the record is the other's now.
    async fn taken_over(&self) -> bool {
        let Some(other) = self.control.driven_elsewhere(&self.r).await else {
            return false;
        };
        tracing::warn!(service = %self.r.service, id = %self.r.id, driver = %other,
            "rollout taken over by another replica; this replica stops driving it");
        self.control.metrics().rollout_forget(&self.r.service);
        true
    }

    /// Reads the counters, updates impact and statistics, ticks the machine.
    async fn tick(&mut self, dt: Duration) {
        let outcomes = self.control.metrics().outcomes(&self.r.service);
        let now = [
            outcomes.pool(Color::Blue).read(),
            outcomes.pool(Color::Green).read(),
        ];
        let read_at = SystemTime::now();
        let tick_from = std::mem::replace(&mut self.last_read_at, read_at);
        // This tick's counts join the pending error batch, or start one.
        let batch_from = if self.r.stats.batch_pending() {
            self.batch_from
        } else {
            tick_from
        };
        let delta = [now[0].since(&self.last[0]), now[1].since(&self.last[1])];
        self.last = now;
        let (ci, bi) = (self.r.canary.index(), self.r.baseline.index());
        let cfg = self.r.plan.analysis.clone();
        let c = Tally::of(&delta[ci], &cfg);
        let b = Tally::of(&delta[bi], &cfg);
        // During a mirror step the canary serves no user: it is judged by
        // the copies of live requests it answered (their failures count
        // against it like user failures would; the impact stays 0).
        let mirrored = self.mirror_tally();
        let user_failures = delta[ci].status_5xx + delta[ci].transport;
        self.r.impact.canary_requests += c.requests;
        self.r.impact.canary_failures += c.failures;
        self.r.impact.user_failures += user_failures;
        self.control
            .metrics()
            .rollout_user_failures(&self.r.service, user_failures);
        if !self.r.is_active() {
            // Lingering: counts only.
            self.publish();
            return;
        }
        self.step_lat[ci].add(&delta[ci]);
        self.step_lat[bi].add(&delta[bi]);
        let c = match mirrored {
            Some(m) => {
                self.r.stats.observe(&cfg, m, b, None, None, None);
                m
            }
            None => {
                self.r.stats.observe(
                    &cfg,
                    c,
                    b,
                    Some(&delta[ci]),
                    Some(&self.step_lat[bi]),
                    Some(&self.step_lat[ci]),
                );
                c
            }
        };
        self.window.push_back((c, b));
        let keep = (GUARD_WINDOW_S * 1000 / TICK.as_millis() as u64) as usize;
        while self.window.len() > keep {
            self.window.pop_front();
        }
        let (mut wc, mut wb) = (Tally::default(), Tally::default());
        for (c, b) in &self.window {
            wc.requests += c.requests;
            wc.failures += c.failures;
            wb.requests += b.requests;
            wb.failures += b.failures;
        }
        self.verdict = self.r.stats.verdict(&cfg, wc, wb);
        let step = self.r.step;
        let state = self.r.state;
        let changed = self
            .r
            .tick(dt.as_millis() as u64, &self.verdict, &now_text());
        let mut evidence_from = tick_from;
        if let Verdict::Fail { rule, .. } = &self.verdict {
            if self.r.state == State::RolledBack && state != State::RolledBack {
                self.r.failed_rule = Some((*rule).to_string());
            }
            if *rule == "error_ratio" {
                evidence_from = batch_from;
            }
        }
        // The next batch starts after this reading (unless this one is
        // still gathering; a new step discards it).
        self.batch_from = if self.r.stats.batch_pending() {
            batch_from
        } else {
            read_at
        };
        if self.r.step != step || self.r.state.is_terminal() {
            self.step_lat = [PoolCounts::default(), PoolCounts::default()];
            self.window.clear();
        }
        if changed || self.r.state != state {
            let applied = self.after_change(state, "analysis").await;
            if applied && self.r.state == State::RolledBack && state != State::RolledBack {
                self.record_reaction(evidence_from, read_at, SystemTime::now())
                    .await;
            }
        } else if self.last_persist.elapsed() >= PERSIST_EVERY {
            self.persist(None, "progress").await;
        }
        self.publish();
    }

    async fn verb(&mut self, verb: Verb, meta: ChangeMeta) -> Result<Value, RolloutError> {
        if let Some(expected) = meta.if_match {
            let current = self.control.generation(&self.r.service).await.unwrap_or(0);
            if expected != current {
                return Err(RolloutError::Stale { expected, current });
            }
        }
        let at = now_text();
        let before = self.r.clone();
        let who = meta.actor.as_str();
        let result = match &verb {
            Verb::Pause => self.r.pause(who, &at),
            Verb::Resume => self.r.resume(who, &at),
            Verb::Promote { full } => self.r.promote(*full, who, &at),
            Verb::Abort { why } => {
                let why = match (why.as_str(), meta.reason.as_deref()) {
                    ("", Some(r)) => r.to_string(),
                    (w, _) => w.to_string(),
                };
                self.r.abort(who, &why, &at)
            }
        };
        if let Err(e) = result {
            self.r = before;
            return Err(e.into());
        }
        tracing::info!(service = %self.r.service, id = %self.r.id, verb = verb.name(), actor = %meta.actor, "rollout verb");
        if self.r.step != before.step {
            self.step_lat = [PoolCounts::default(), PoolCounts::default()];
            self.window.clear();
        }
        let what = format!("{} by {}", verb.name(), meta.actor);
        if let Err(e) = self.apply(&what, meta.reason.as_deref()).await {
            // Not persisted: the rollout stays as it was.
            self.r = before;
            return Err(e);
        }
        self.after_state(before.state);
        self.publish();
        Ok(self.r.view(false))
    }

    /// Applies what the analysis changed; false if it could not be
    /// persisted (retried when the driver saves its final counts).
    async fn after_change(&mut self, before: State, what: &str) -> bool {
        if let Err(e) = self.apply(what, None).await {
            tracing::error!(service = %self.r.service, id = %self.r.id, error = %e, "rollout: could not apply the change; will retry");
            return false;
        }
        self.after_state(before);
        true
    }

    /// An analysis rollback was published at `published`: keeps how long
    /// it took from the evidence (read between `evidence_from` and
    /// `decided`) to the data plane, in the record and the log.
    async fn record_reaction(
        &mut self,
        evidence_from: SystemTime,
        decided: SystemTime,
        published: SystemTime,
    ) {
        let reaction = Reaction {
            evidence_from: time_text(evidence_from),
            decided_at: time_text(decided),
            published_at: time_text(published),
            decision_to_publish_ms: ms_between(evidence_from, published),
            commit_ms: ms_between(decided, published),
        };
        tracing::info!(service = %self.r.service, id = %self.r.id,
            decision_to_publish_ms = reaction.decision_to_publish_ms,
            commit_ms = reaction.commit_ms, "rollback published");
        self.r.reaction = Some(reaction);
        // The weight is applied already: this saves the record alone.
        self.persist(None, "rollback reaction time").await;
    }

    fn after_state(&mut self, before: State) {
        let m = self.control.metrics();
        m.rollout_set(&self.r.service, self.r.state.as_str(), self.r.step);
        if self.r.state.is_terminal() && !before.is_terminal() {
            m.rollout_ended(&self.r.service, self.r.state.as_str());
            tracing::info!(service = %self.r.service, id = %self.r.id, state = self.r.state.as_str(), reason = %self.r.reason, "rollout ended");
        }
    }

    /// Persists the record, with the weight change it wants (if any).
    async fn apply(&mut self, what: &str, reason: Option<&str>) -> Result<(), RolloutError> {
        let weights = (self.r.weight_bp != self.applied_bp)
            .then(|| weights_for(self.r.canary, self.r.weight_bp));
        let meta = rollout_meta(&self.r, reason, what);
        self.control
            .commit_rollout(&self.r.service, self.r.clone(), weights, &meta)
            .await?;
        self.applied_bp = self.r.weight_bp;
        self.last_persist = tokio::time::Instant::now();
        Ok(())
    }

    async fn persist(&mut self, _weights: Option<()>, what: &str) {
        if let Err(e) = self.apply(what, None).await {
            tracing::error!(service = %self.r.service, id = %self.r.id, error = %e, "rollout: could not persist");
        }
    }

    /// The canary's mirrored copies since the last tick, while a mirror
    /// step runs (None otherwise). Counters only grow, but a reload that
    /// rebuilds the service starts them again: a smaller read counts as 0.
    fn mirror_tally(&mut self) -> Option<Tally> {
        if self.r.mirror_wish().is_none() {
            self.last_mirror = None;
            return None;
        }
        let now = self
            .control
            .mirror_outcomes(&self.r.service, self.r.canary)?;
        // The first read of a step is the starting point: copies sent
        // before it (a manual mirror, an earlier rollout) are not judged.
        let last = self.last_mirror.replace(now).unwrap_or(now);
        Some(Tally {
            requests: now.requests.saturating_sub(last.requests),
            failures: now.failures.saturating_sub(last.failures),
        })
    }

    /// Starts or stops the mirror as the current step wants (after every
    /// tick and verb, so a rollback or abort also stops the copies).
    async fn sync_mirror(&mut self) {
        match (self.r.mirror_wish(), self.mirror_on) {
            (Some(p), false) => {
                set_mirror(&self.control, &self.r, p).await;
                self.mirror_on = true;
            }
            (None, true) => {
                clear_mirror(&self.control, &self.r).await;
                self.mirror_on = false;
            }
            _ => {}
        }
    }

    fn publish(&self) {
        self.latest.send_replace(Arc::new(self.r.clone()));
    }
}
