//! The rollout state machine, as pure code: the persisted rollout record
//! and every transition (tick, operator verbs). No clock (times come in as
//! arguments), no I/O. The driver diffs the record's `weight_bp` and mirror
//! wish against the routing state and applies the difference.
//!
//! ```text
//!             ┌──────── promote / pause elapsed ∧ min_requests ───────┐
//!  start ─▶ mirroring ─▶ progressing(i) ─▶ … ─▶ progressing(last) ─▶ succeeded
//!              │  ▲          │  ▲ gate step: paused(gate) ─ promote ─┘
//!      pause   ▼  │ resume   ▼  │ both pools failing: paused(baseline) ⇄
//!            paused(operator)
//!  any non-terminal ── rule fails ──▶ rolled_back (canary 0 %)
//!                   ── abort ───────▶ aborted (canary 0 %)
//!                   ── promote full ▶ succeeded (canary 100 %, forced)
//! ```

use serde::{Deserialize, Serialize};

use crate::color::Color;
use crate::control_plane::rollout::analysis::{RuleReport, StepStats, Tally, Verdict};
use crate::control_plane::rollout::plan::{Plan, Step};
use crate::weights::Weights;

/// Timeline entries kept per rollout.
const TIMELINE_LIMIT: usize = 200;

/// Where a rollout is (SPEC §10 `state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum State {
    /// At a weight step.
    Progressing,
    /// At a mirror step (weight 0).
    Mirroring,
    /// Held: by the operator, at a gate, or while both pools fail.
    Paused,
    /// The canary took all traffic.
    Succeeded,
    /// The analysis failed the canary; it was set to 0 %.
    RolledBack,
    /// The operator (or a manual override) stopped it; canary at 0 %.
    Aborted,
}

impl State {
    /// Every state, for the metric series.
    pub(crate) const ALL: [State; 6] = [
        State::Progressing,
        State::Mirroring,
        State::Paused,
        State::Succeeded,
        State::RolledBack,
        State::Aborted,
    ];

    /// Label and JSON value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            State::Progressing => "progressing",
            State::Mirroring => "mirroring",
            State::Paused => "paused",
            State::Succeeded => "succeeded",
            State::RolledBack => "rolled_back",
            State::Aborted => "aborted",
        }
    }

    /// Succeeded, rolled back or aborted.
    pub(crate) fn is_terminal(self) -> bool {
        matches!(self, State::Succeeded | State::RolledBack | State::Aborted)
    }
}

/// Why a rollout is paused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum PauseKind {
    /// `POST …/rollout/pause`.
    Operator,
    /// A gate step waits for `promote`.
    Gate,
    /// Both pools fail alike; resumes by itself when they recover.
    BaselineUnhealthy,
}

/// The canary's effect on users, over the whole rollout (never reset).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Impact {
    /// Requests the canary answered.
    pub(crate) canary_requests: u64,
    /// Of which failed (any kind the plan counts), as the analysis saw them.
    pub(crate) canary_failures: u64,
    /// User requests whose final answer was a failure from the canary.
    pub(crate) user_failures: u64,
}

/// One line of the timeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct TimelineEntry {
    /// RFC 3339.
    pub(crate) at: String,
    /// `started`, `step`, `paused`, `resumed`, `promoted`, `rolled_back`,
    /// `taken_over` (fleet mode), …
    pub(crate) event: String,
    /// Step index then.
    pub(crate) step: usize,
    /// Canary weight then (percent).
    pub(crate) weight: f64,
    /// Details.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(crate) detail: String,
}

/// What one step saw, kept for the report when it ends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct StepReport {
    /// Step index.
    pub(crate) step: usize,
    /// Canary weight (percent).
    pub(crate) weight: f64,
    /// Observed time (s).
    pub(crate) duration_s: f64,
    /// Canary requests and failures.
    pub(crate) canary: Tally,
    /// Baseline requests and failures.
    pub(crate) baseline: Tally,
    /// Canary p99 (ms).
    pub(crate) canary_p99_ms: Option<f64>,
    /// Baseline p99 (ms).
    pub(crate) baseline_p99_ms: Option<f64>,
    /// How the step ended: `passed`, `promoted`, `rolled_back`, …
    pub(crate) outcome: String,
}

/// A refused verb; the rollout is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub(crate) struct VerbError(pub(crate) String);

/// A rollout: everything persisted about it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Rollout {
    /// `r-<service>-<n>`.
    pub(crate) id: String,
    /// The service.
    pub(crate) service: String,
    /// The plan.
    pub(crate) plan: Plan,
    /// Where it is.
    pub(crate) state: State,
    /// Why it is paused (when `state` is paused).
    pub(crate) pause: Option<PauseKind>,
    /// The state a pause returns to.
    pub(crate) resume_to: Option<State>,
    /// Index in `plan.steps`.
    pub(crate) step: usize,
    /// Time observed in this step (ms); only runs while progressing or
    /// mirroring, never while paused or while the proxy is down.
    pub(crate) step_elapsed_ms: u64,
    /// The pool gaining weight.
    pub(crate) canary: Color,
    /// The pool live when it started.
    pub(crate) baseline: Color,
    /// The canary's weight the rollout wants now (basis points).
    pub(crate) weight_bp: u16,
    /// RFC 3339.
    pub(crate) started_at: String,
    /// RFC 3339.
    pub(crate) updated_at: String,
    /// Why it is where it is, in one sentence with the figures.
    pub(crate) reason: String,
    /// Statistics of the current step.
    pub(crate) stats: StepStats,
    /// User impact over the whole rollout.
    pub(crate) impact: Impact,
    /// Ended by `promote full` (analysis skipped).
    #[serde(default)]
    pub(crate) forced: bool,
    /// What happened, oldest first.
    #[serde(default)]
    pub(crate) timeline: Vec<TimelineEntry>,
    /// One entry per step that ended.
    #[serde(default)]
    pub(crate) steps_report: Vec<StepReport>,
    /// When it ended (RFC 3339).
    #[serde(default)]
    pub(crate) ended_at: Option<String>,
    /// The rule that rolled it back.
    #[serde(default)]
    pub(crate) failed_rule: Option<String>,
    /// Fleet mode: the replica whose driver runs it, and so whose traffic
    /// the analysis judges (SPEC §11); another replica replaces it when it
    /// takes the rollout over (`taken_over` in the timeline says from
    /// when). `None` with one replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) driver: Option<String>,
    /// An analysis rollback: when it was decided and when the generation
    /// with the canary at 0 % was published (set by the driver).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) reaction: Option<Reaction>,
    /// Fleet mode: every replica that drove it, in order, with when and in
    /// which step it began: whose traffic the analysis judged when (the
    /// report's `judged_by`). Empty with one replica.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) drivers: Vec<DriverSpan>,
}

/// How fast an analysis rollback reached the data plane (issue 11, item 5:
/// ≤ 1 s from the deciding response at ≥ 500 requests/s). The driver reads
/// the counters once a tick, and the error test updates once a batch of
/// ≥ 200 requests is in; the deciding response is one of those counted
/// since `evidence_from`, so the time from it to the publication is at
/// most `decision_to_publish_ms` (one batch + one tick + the commit).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Reaction {
    /// The earliest the deciding response can have been counted (RFC 3339,
    /// ms): for `error_ratio` the reading before the first one of the batch
    /// whose test failed; for the other rules the reading before the
    /// deciding one.
    pub(crate) evidence_from: String,
    /// The reading that held the deciding response, on which the verdict
    /// failed (RFC 3339, ms).
    pub(crate) decided_at: String,
    /// When the generation setting the canary to 0 % was published, after
    /// it was persisted (RFC 3339, ms).
    pub(crate) published_at: String,
    /// `published_at` − `evidence_from` in ms: an upper bound of the time
    /// from the deciding response to the publication.
    pub(crate) decision_to_publish_ms: f64,
    /// `published_at` − `decided_at` in ms: persisting and publishing alone.
    pub(crate) commit_ms: f64,
}

/// One replica's turn at driving a rollout (fleet mode).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct DriverSpan {
    /// `replica_id`.
    pub(crate) replica: String,
    /// When it began driving, RFC 3339.
    pub(crate) since: String,
    /// The step it began in.
    pub(crate) step: usize,
}

/// The weights that give `canary` the share `bp` (basis points).
pub(crate) fn weights_for(canary: Color, bp: u16) -> Weights {
    let green_bp = match canary {
        Color::Green => bp.min(10_000),
        Color::Blue => 10_000 - bp.min(10_000),
    };
    // Whole basis points are always valid weights.
    Weights::from_green_percent(f64::from(green_bp) / 100.0).unwrap_or(Weights::full(Color::Blue))
}

fn pct(bp: u16) -> f64 {
    f64::from(bp) / 100.0
}

impl Rollout {
    /// A new rollout at its first step.
    pub(crate) fn start(
        id: String,
        service: String,
        plan: Plan,
        canary: Color,
        at: &str,
    ) -> Rollout {
        let mut r = Rollout {
            id,
            service,
            plan,
            state: State::Progressing,
            pause: None,
            resume_to: None,
            step: 0,
            step_elapsed_ms: 0,
            canary,
            baseline: canary.other(),
            weight_bp: 0,
            started_at: at.to_string(),
            updated_at: at.to_string(),
            reason: String::new(),
            stats: StepStats::default(),
            impact: Impact::default(),
            forced: false,
            timeline: Vec::new(),
            steps_report: Vec::new(),
            ended_at: None,
            failed_rule: None,
            driver: None,
            reaction: None,
            drivers: Vec::new(),
        };
        r.event(
            at,
            "started",
            format!("canary {}, baseline {}", r.canary, r.baseline),
        );
        r.enter_step(0, at);
        r
    }

    /// Is it still running (not succeeded, rolled back or aborted)?
    pub(crate) fn is_active(&self) -> bool {
        !self.state.is_terminal()
    }

    /// The mirror share the rollout wants now (None: no mirroring).
    pub(crate) fn mirror_wish(&self) -> Option<f64> {
        let mirroring = self.state == State::Mirroring
            || (self.state == State::Paused && self.resume_to == Some(State::Mirroring));
        match (mirroring, self.plan.steps.get(self.step)) {
            (true, Some(Step::Mirror { percent, .. })) => Some(*percent),
            _ => None,
        }
    }

    /// Seconds left in the current step's pause or mirror time.
    pub(crate) fn step_remaining_s(&self) -> Option<f64> {
        if self.state.is_terminal() {
            return None;
        }
        let total = match self.plan.steps.get(self.step)? {
            Step::Weight { pause, .. } => pause.as_millis() as u64,
            Step::Mirror { duration, .. } => duration.as_millis() as u64,
            Step::Gate { .. } => return None,
        };
        Some(total.saturating_sub(self.step_elapsed_ms) as f64 / 1000.0)
    }

    /// Fleet mode: replica `me` started it and drives it.
    pub(crate) fn set_driver(&mut self, me: &str, at: &str) {
        self.driver = Some(me.to_string());
        self.drivers.push(DriverSpan {
            replica: me.to_string(),
            since: at.to_string(),
            step: self.step,
        });
    }

    /// Fleet mode: may replica `me` take this rollout over? Only a running
    /// rollout whose driver replica is gone (no presence key among `live`,
    /// its lease expired) or was never named (a record imported from a
    /// single replica), and only while `me` itself is live (a replica cut
    /// off from etcd may be the one the others think dead). Several
    /// replicas may decide so at once: the compare-and-swap of the claim
    /// lets exactly one win.
    pub(crate) fn may_take_over(&self, me: &str, live: &[String]) -> bool {
        let is_live = |id: &str| live.iter().any(|l| l == id);
        self.is_active()
            && is_live(me)
            && match self.driver.as_deref() {
                Some(d) => d != me && !is_live(d),
                None => true,
            }
    }

    /// Fleet mode: replica `me` drives it from now on, from the step and
    /// the time left that the record has; the timeline says so, which is
    /// how the report tells whose traffic the analysis judged when.
    pub(crate) fn take_over(&mut self, me: &str, at: &str) {
        let detail = match self.driver.as_deref() {
            Some(d) => format!(
                "replica {me} took over from {d} (its presence expired); the analysis judges {me}'s traffic from here"
            ),
            None => format!(
                "replica {me} took over (no driver was named); the analysis judges {me}'s traffic from here"
            ),
        };
        self.set_driver(me, at);
        self.event(at, "taken_over", detail);
    }

    fn event(&mut self, at: &str, event: &str, detail: String) {
        self.updated_at = at.to_string();
        self.timeline.push(TimelineEntry {
            at: at.to_string(),
            event: event.to_string(),
            step: self.step,
            weight: pct(self.weight_bp),
            detail,
        });
        if self.timeline.len() > TIMELINE_LIMIT {
            self.timeline.remove(0);
        }
    }

    fn close_step(&mut self, outcome: &str) {
        if self.step >= self.plan.steps.len() {
            return;
        }
        if let Some(Step::Gate { .. }) = self.plan.steps.get(self.step) {
            return;
        }
        self.steps_report.push(StepReport {
            step: self.step,
            weight: pct(self.weight_bp),
            duration_s: self.step_elapsed_ms as f64 / 1000.0,
            canary: self.stats.canary,
            baseline: self.stats.baseline,
            canary_p99_ms: self.stats.canary_p99_us.map(|u| u as f64 / 1000.0),
            baseline_p99_ms: self.stats.baseline_p99_us.map(|u| u as f64 / 1000.0),
            outcome: outcome.to_string(),
        });
    }

    fn finish(&mut self, state: State, weight_bp: u16, reason: String, at: &str) {
        self.close_step(state.as_str());
        self.state = state;
        self.pause = None;
        self.resume_to = None;
        self.weight_bp = weight_bp;
        self.reason = reason.clone();
        self.ended_at = Some(at.to_string());
        self.event(at, state.as_str(), reason);
    }

    /// Enters step `i` (statistics restart); past the last step: succeeded.
    fn enter_step(&mut self, i: usize, at: &str) {
        self.step = i;
        self.step_elapsed_ms = 0;
        self.stats.next_step();
        self.pause = None;
        self.resume_to = None;
        let Some(step) = self.plan.steps.get(i).cloned() else {
            let reason = format!(
                "succeeded: {} took 100 % after {} steps; {} user requests got a failure from it",
                self.canary,
                self.plan.steps.len(),
                self.impact.user_failures
            );
            self.step = self.plan.steps.len().saturating_sub(1);
            self.finish(State::Succeeded, 10_000, reason, at);
            return;
        };
        match step {
            Step::Weight {
                weight_bp, pause, ..
            } => {
                self.weight_bp = weight_bp;
                self.state = State::Progressing;
                self.reason = format!(
                    "step {i}: {} at {} %, observing{}",
                    self.canary,
                    pct(weight_bp),
                    if pause.is_zero() {
                        String::new()
                    } else {
                        format!(
                            " for {}",
                            crate::control_plane::rollout::plan::fmt_duration(pause)
                        )
                    }
                );
                self.event(at, "step", format!("weight {} %", pct(weight_bp)));
                // The last step at 100 % with nothing to observe: done.
                if weight_bp == 10_000 && pause.is_zero() && i + 1 == self.plan.steps.len() {
                    self.enter_step(i + 1, at);
                }
            }
            Step::Gate { name } => {
                self.state = State::Paused;
                self.pause = Some(PauseKind::Gate);
                self.resume_to = Some(State::Progressing);
                self.reason = format!(
                    "waiting at gate `{name}` with {} at {} %: POST …/rollout/promote to go on",
                    self.canary,
                    pct(self.weight_bp)
                );
                self.event(at, "gate", name);
            }
            Step::Mirror { percent, duration } => {
                self.state = State::Mirroring;
                self.reason = format!(
                    "step {i}: mirroring {percent} % of requests to {} for {}; weight stays 0",
                    self.canary,
                    crate::control_plane::rollout::plan::fmt_duration(duration)
                );
                self.event(at, "mirror", format!("{percent} %"));
            }
        }
    }

    /// One analysis tick: `dt_ms` of observation time passed (counted only
    /// while progressing or mirroring) and the analysis said `verdict`.
    /// Returns whether anything but the clock changed.
    pub(crate) fn tick(&mut self, dt_ms: u64, verdict: &Verdict, at: &str) -> bool {
        if self.state.is_terminal() {
            return false;
        }
        match verdict {
            Verdict::Fail { reason, .. } => {
                let reason = format!(
                    "rolled back at step {} ({} at {} %): {reason}; {} user requests got a failure from {}",
                    self.step,
                    self.canary,
                    pct(self.weight_bp),
                    self.impact.user_failures,
                    self.canary
                );
                self.finish(State::RolledBack, 0, reason, at);
                return true;
            }
            Verdict::BaselineUnhealthy { reason } => {
                if self.state != State::Paused {
                    self.resume_to = Some(self.state);
                    self.state = State::Paused;
                    self.pause = Some(PauseKind::BaselineUnhealthy);
                    self.reason = format!("paused: {reason}");
                    self.event(at, "paused", self.reason.clone());
                    return true;
                }
                return false;
            }
            Verdict::Pass => {
                if self.pause == Some(PauseKind::BaselineUnhealthy) {
                    self.state = self.resume_to.take().unwrap_or(State::Progressing);
                    self.pause = None;
                    self.reason = format!(
                        "resumed at step {}: the baseline recovered ({} at {} %)",
                        self.step,
                        self.canary,
                        pct(self.weight_bp)
                    );
                    self.event(at, "resumed", "baseline recovered".into());
                    return true;
                }
            }
        }
        if !matches!(self.state, State::Progressing | State::Mirroring) {
            return false;
        }
        self.step_elapsed_ms = self.step_elapsed_ms.saturating_add(dt_ms);
        let passed = match self.plan.steps.get(self.step) {
            Some(Step::Weight {
                pause, weight_bp, ..
            }) => {
                self.step_elapsed_ms >= pause.as_millis() as u64
                    && (*weight_bp == 10_000
                        || self.stats.canary.requests >= self.plan.min_requests(self.step))
            }
            // Mirrored requests are not counted yet (mirroring is wired
            // when the mirror branch lands): a mirror step passes on time.
            Some(Step::Mirror { duration, .. }) => {
                self.step_elapsed_ms >= duration.as_millis() as u64
            }
            _ => false,
        };
        if passed {
            self.close_step("passed");
            self.event(at, "step_passed", String::new());
            self.enter_step(self.step + 1, at);
        }
        passed
    }

    /// `pause`: progress stops within a tick; the analysis keeps running.
    pub(crate) fn pause(&mut self, who: &str, at: &str) -> Result<(), VerbError> {
        self.must_be_active()?;
        match (self.state, self.pause) {
            (State::Paused, Some(PauseKind::Gate)) => {
                Err(VerbError("the rollout already waits at a gate".into()))
            }
            (State::Paused, Some(PauseKind::Operator)) => Ok(()),
            (State::Paused, _) => {
                self.pause = Some(PauseKind::Operator);
                self.reason = format!("paused by {who} at step {}", self.step);
                self.event(at, "paused", who.to_string());
                Ok(())
            }
            (s, _) => {
                self.resume_to = Some(s);
                self.state = State::Paused;
                self.pause = Some(PauseKind::Operator);
                self.reason = format!(
                    "paused by {who} at step {} ({} at {} %); analysis keeps running",
                    self.step,
                    self.canary,
                    pct(self.weight_bp)
                );
                self.event(at, "paused", who.to_string());
                Ok(())
            }
        }
    }

    /// `resume`: back to where the pause found it; its timer continues.
    pub(crate) fn resume(&mut self, who: &str, at: &str) -> Result<(), VerbError> {
        self.must_be_active()?;
        match (self.state, self.pause) {
            (State::Paused, Some(PauseKind::Gate)) => Err(VerbError(
                "the rollout waits at a gate: promote it to go on".into(),
            )),
            (State::Paused, _) => {
                self.state = self.resume_to.take().unwrap_or(State::Progressing);
                self.pause = None;
                self.reason = format!(
                    "resumed by {who} at step {} ({} at {} %)",
                    self.step,
                    self.canary,
                    pct(self.weight_bp)
                );
                self.event(at, "resumed", who.to_string());
                Ok(())
            }
            _ => Err(VerbError(format!(
                "the rollout is {}, not paused",
                self.state.as_str()
            ))),
        }
    }

    /// `promote`: the next step at once (skips a pause or a gate; the
    /// analysis can still fail it); `full`: straight to 100 %, succeeded.
    pub(crate) fn promote(&mut self, full: bool, who: &str, at: &str) -> Result<(), VerbError> {
        self.must_be_active()?;
        if full {
            self.forced = true;
            let reason = format!(
                "promoted to 100 % by {who} from step {} (forced: analysis skipped); {} user requests got a failure from {}",
                self.step, self.impact.user_failures, self.canary
            );
            self.finish(State::Succeeded, 10_000, reason, at);
            return Ok(());
        }
        self.close_step("promoted");
        self.event(at, "promoted", who.to_string());
        self.enter_step(self.step + 1, at);
        Ok(())
    }

    /// `abort`: canary back to 0 % in one generation.
    pub(crate) fn abort(&mut self, who: &str, why: &str, at: &str) -> Result<(), VerbError> {
        self.must_be_active()?;
        let reason = format!(
            "aborted by {who} at step {} ({} was at {} %){}; {} user requests got a failure from {}",
            self.step,
            self.canary,
            pct(self.weight_bp),
            if why.is_empty() { String::new() } else { format!(": {why}") },
            self.impact.user_failures,
            self.canary
        );
        self.finish(State::Aborted, 0, reason, at);
        Ok(())
    }

    fn must_be_active(&self) -> Result<(), VerbError> {
        if self.state.is_terminal() {
            Err(VerbError(format!(
                "rollout {} already ended ({})",
                self.id,
                self.state.as_str()
            )))
        } else {
            Ok(())
        }
    }

    /// The rollout object of SPEC §10 (`report` adds the steps and timeline).
    pub(crate) fn view(&self, with_report: bool) -> serde_json::Value {
        let verdict = match (self.state, self.pause, self.failed_rule.as_deref()) {
            (State::RolledBack, _, Some(rule)) => Verdict::Fail {
                rule: match rule {
                    "latency" => "latency",
                    "error_abs" => "error_abs",
                    _ => "error_ratio",
                },
                reason: String::new(),
            },
            (State::Paused, Some(PauseKind::BaselineUnhealthy), _) => Verdict::BaselineUnhealthy {
                reason: String::new(),
            },
            _ => Verdict::Pass,
        };
        let rules: Vec<RuleReport> = self.stats.reports(&self.plan.analysis, &verdict);
        let weights = weights_for(self.canary, self.weight_bp);
        let mut v = serde_json::json!({
            "id": self.id,
            "service": self.service,
            "state": self.state.as_str(),
            "pause": self.pause,
            "step": self.step,
            "steps": self.plan.steps.iter().map(Step::to_json).collect::<Vec<_>>(),
            "plan": self.plan.name,
            "canary": self.canary,
            "baseline": self.baseline,
            "weights": weights,
            "started_at": self.started_at,
            "updated_at": self.updated_at,
            "ended_at": self.ended_at,
            "step_remaining_s": self.step_remaining_s(),
            "reason": self.reason,
            "driver": self.driver,
            "analysis": { "rules": rules },
            "impact": self.impact,
        });
        if with_report {
            if let Some(o) = v.as_object_mut() {
                o.insert(
                    "report".into(),
                    serde_json::json!({
                        "result": self.state.as_str(),
                        "decision": self.reason,
                        "forced": self.forced,
                        "steps": self.steps_report,
                        "impact": self.impact,
                        "timeline": self.timeline,
                        "reaction": self.reaction,
                        "judged_by": self.drivers,
                    }),
                );
            }
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn plan() -> Plan {
        Plan::from_json(&json!({"steps": [
            {"mirror": 50, "duration": "1s"},
            {"weight": 1, "pause": "2s", "min_requests": 10},
            {"gate": "approve"},
            {"weight": 50, "pause": "1s"},
            {"weight": 100}
        ]}))
        .expect("plan")
    }

    fn feed(r: &mut Rollout, canary: u64) {
        let cfg = r.plan.analysis.clone();
        r.stats.observe(
            &cfg,
            Tally {
                requests: canary,
                failures: 0,
            },
            Tally {
                requests: canary * 10,
                failures: 0,
            },
            None,
            None,
            None,
        );
    }

    #[test]
    fn a_plan_runs_through_mirror_gate_and_steps() {
        let mut r = Rollout::start("r1".into(), "web".into(), plan(), Color::Green, "t0");
        assert_eq!(
            (r.state, r.weight_bp, r.mirror_wish()),
            (State::Mirroring, 0, Some(50.0))
        );
        assert!(r.tick(1000, &Verdict::Pass, "t1"));
        assert_eq!((r.state, r.step, r.weight_bp), (State::Progressing, 1, 100));
        assert_eq!(r.mirror_wish(), None);
        // Time alone does not pass a step without its requests.
        assert!(!r.tick(5000, &Verdict::Pass, "t2"));
        feed(&mut r, 10);
        assert!(r.tick(250, &Verdict::Pass, "t3"));
        assert_eq!(
            (r.state, r.pause, r.step),
            (State::Paused, Some(PauseKind::Gate), 2)
        );
        assert!(r.resume("ops", "t4").is_err());
        assert!(!r.tick(10_000, &Verdict::Pass, "t5"), "a gate waits");
        r.promote(false, "ops", "t6").expect("promote");
        assert_eq!(
            (r.state, r.step, r.weight_bp),
            (State::Progressing, 3, 5000)
        );
        // Paused: time stops; resume continues the timer.
        r.pause("ops", "t7").expect("pause");
        assert!(!r.tick(10_000, &Verdict::Pass, "t8"));
        assert_eq!(r.step_elapsed_ms, 0);
        r.resume("ops", "t9").expect("resume");
        feed(&mut r, 100);
        assert!(r.tick(1000, &Verdict::Pass, "t10"));
        assert_eq!((r.state, r.weight_bp), (State::Succeeded, 10_000));
        assert!(r.abort("ops", "", "t11").is_err(), "ended");
        // mirror, 1 %, 50 % and the final 100 % (gates have no report).
        assert_eq!(r.steps_report.len(), 4);
    }

    #[test]
    fn reaction_is_reported_and_records_saved_without_it_still_load() {
        let mut r = Rollout::start("r1".into(), "web".into(), plan(), Color::Green, "t0");
        // A record persisted before the field existed has no `reaction`.
        let saved = serde_json::to_value(&r).expect("serialize");
        assert!(saved.get("reaction").is_none(), "{saved}");
        let loaded: Rollout = serde_json::from_value(saved).expect("old record loads");
        assert_eq!(loaded, r);
        assert_eq!(r.view(true)["report"]["reaction"], serde_json::Value::Null);
        r.reaction = Some(Reaction {
            evidence_from: "a".into(),
            decided_at: "b".into(),
            published_at: "c".into(),
            decision_to_publish_ms: 512.5,
            commit_ms: 0.5,
        });
        let back: Rollout =
            serde_json::from_value(serde_json::to_value(&r).expect("serialize")).expect("load");
        assert_eq!(back, r, "persisted with the routing state, restored");
        let report = &r.view(true)["report"]["reaction"];
        assert_eq!(report["decision_to_publish_ms"], 512.5);
        assert_eq!(report["published_at"], "c");
    }

    #[test]
    fn failures_roll_back_even_while_paused_and_ties_pause() {
        let mut r = Rollout::start("r1".into(), "web".into(), plan(), Color::Blue, "t0");
        r.promote(false, "ops", "t1").expect("promote");
        assert_eq!(
            weights_for(Color::Blue, r.weight_bp).percent(Color::Blue),
            1.0
        );
        let tie = Verdict::BaselineUnhealthy {
            reason: "both".into(),
        };
        assert!(r.tick(250, &tie, "t2"));
        assert_eq!(
            (r.state, r.pause),
            (State::Paused, Some(PauseKind::BaselineUnhealthy))
        );
        assert!(r.tick(250, &Verdict::Pass, "t3"));
        assert_eq!(r.state, State::Progressing);
        r.pause("ops", "t4").expect("pause");
        let fail = Verdict::Fail {
            rule: "error_ratio",
            reason: "bad".into(),
        };
        assert!(r.tick(250, &fail, "t5"));
        assert_eq!((r.state, r.weight_bp), (State::RolledBack, 0));
        assert!(r.reason.contains("bad"));
        let mut r = Rollout::start("r2".into(), "web".into(), plan(), Color::Green, "t0");
        r.promote(true, "ops", "t1").expect("full");
        assert_eq!(
            (r.state, r.weight_bp, r.forced),
            (State::Succeeded, 10_000, true)
        );
        let mut r = Rollout::start("r3".into(), "web".into(), plan(), Color::Green, "t0");
        r.abort("ops", "bad build", "t1").expect("abort");
        assert_eq!((r.state, r.weight_bp), (State::Aborted, 0));
    }
    /// Who may take a rollout over (issue 13 item 8): only a live replica,
    /// only from a driver without presence, only while it runs.
    #[test]
    fn only_a_live_replica_takes_over_from_a_dead_driver() {
        let live = |ids: &[&str]| ids.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let mut r = Rollout::start("r1".into(), "web".into(), plan(), Color::Green, "t0");
        r.driver = Some("a".into());
        // The driver is alive: nobody takes over, not even itself.
        assert!(!r.may_take_over("b", &live(&["a", "b", "c"])));
        assert!(!r.may_take_over("a", &live(&["a", "b"])));
        // The driver's presence expired: any live replica may.
        assert!(r.may_take_over("b", &live(&["b", "c"])));
        assert!(r.may_take_over("c", &live(&["b", "c"])));
        // A replica without presence itself (cut off) may not.
        assert!(!r.may_take_over("b", &live(&["c"])));
        assert!(!r.may_take_over("b", &[]));
        // No driver named (imported from a single replica): any live one.
        let mut unnamed = r.clone();
        unnamed.driver = None;
        assert!(unnamed.may_take_over("c", &live(&["c"])));
        // The claim keeps id, step and time, and says who judges what.
        r.step_elapsed_ms = 1500;
        let before = r.clone();
        r.take_over("b", "t9");
        assert_eq!(r.driver.as_deref(), Some("b"));
        assert_eq!(
            (&r.id, r.step, r.step_elapsed_ms, r.state, r.weight_bp),
            (
                &before.id,
                before.step,
                1500,
                before.state,
                before.weight_bp
            )
        );
        let last = r.timeline.last().expect("event");
        assert_eq!(last.event, "taken_over");
        let judged: Vec<_> = r
            .drivers
            .iter()
            .map(|d| (d.replica.as_str(), d.step))
            .collect();
        assert_eq!(judged, [("b", 0)], "the first driver was set by hand here");
        assert!(last.detail.contains("from a"), "{}", last.detail);
        assert!(!r.may_take_over("c", &live(&["b", "c"])), "b drives now");
        // An ended rollout is never taken over.
        let mut ended = before.clone();
        ended.abort("ops", "", "t1").expect("abort");
        assert!(!ended.may_take_over("b", &live(&["b"])));
    }
}
