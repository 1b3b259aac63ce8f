//! Routing state and the one pure function that changes it.
//!
//! The dynamic state of every service is plain data: its weights, its
//! generation, the backends of its two pools, and its history. Every change
//! (admin API, SIGHUP reload, and the controllers of later issues) is a
//! [`Command`] given to [`apply`], which either returns the new state of that
//! service or refuses with a [`CommandError`] and changes nothing. The caller
//! ([`crate::control_plane::control`]) then persists the new state and publishes a new
//! routing snapshot, in that order.

use std::collections::{BTreeMap, VecDeque};
use std::time::SystemTime;

use serde::de::{self, Deserializer};
use serde::ser::Serializer;
use serde::{Deserialize, Serialize};

use crate::color::Color;
use crate::config::mirror::MirrorSpec;
use crate::config::rules::{check_rules, RuleError, RuleSpec};
use crate::config::{BackendAddr, Config, ServiceConfig};
use crate::control_plane::rollout::machine::Rollout;
use crate::weights::{Live, Weights};

mod history;
pub(crate) use history::History;

/// How many history entries a service keeps (oldest dropped first).
pub(crate) const HISTORY_LIMIT: usize = 500;

/// The backends of one pool, and where they came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PoolState {
    /// The backends serving now.
    #[serde(with = "addr_list")]
    pub(crate) backends: Vec<BackendAddr>,
    /// The config file's list when this state was last reconciled with it.
    /// If the file's list changes, the file wins; otherwise `backends` (which
    /// the API may have replaced) stands. So the latest writer wins.
    #[serde(with = "addr_list")]
    pub(crate) config: Vec<BackendAddr>,
}

/// What kind of change a history entry records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Action {
    /// The service first appeared (from `initial`).
    Init,
    /// All traffic to one pool.
    Switch,
    /// Weights set.
    Split,
    /// Back to the previous pool or generation.
    Rollback,
    /// A pool's backends replaced (API, or config reload).
    Pool,
    /// The targeting rules replaced (API, or config reload).
    Rules,
    /// Traffic mirroring set, changed or stopped.
    Mirror,
}

impl Action {
    /// Lowercase name, as in JSON and metric labels.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Action::Init => "init",
            Action::Switch => "switch",
            Action::Split => "split",
            Action::Rollback => "rollback",
            Action::Pool => "pool",
            Action::Rules => "rules",
            Action::Mirror => "mirror",
        }
    }
}

/// A pool replacement recorded in history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PoolChange {
    /// The pool replaced.
    pub(crate) color: Color,
    /// Backends before.
    #[serde(with = "addr_list")]
    pub(crate) from: Vec<BackendAddr>,
    /// Backends after.
    #[serde(with = "addr_list")]
    pub(crate) to: Vec<BackendAddr>,
}

/// The targeting rules of a service, and where they came from: the same
/// precedence as [`PoolState`] (a change in the file wins, else the API's
/// list stands).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RulesState {
    /// The rules in force, in order.
    pub(crate) rules: Vec<RuleSpec>,
    /// The config file's list when last reconciled with it.
    pub(crate) config: Vec<RuleSpec>,
}

/// A rules replacement recorded in history: rule names before and after.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RulesChange {
    /// Names before.
    pub(crate) from: Vec<String>,
    /// Names after.
    pub(crate) to: Vec<String>,
}

impl RulesChange {
    fn of(from: &[RuleSpec], to: &[RuleSpec]) -> RulesChange {
        let names = |l: &[RuleSpec]| l.iter().map(|r| r.name.clone()).collect();
        RulesChange {
            from: names(from),
            to: names(to),
        }
    }
}

/// A mirror change recorded in history: the mirror before and after
/// (`null`: off).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct MirrorChange {
    /// Before.
    pub(crate) from: Option<MirrorSpec>,
    /// After.
    pub(crate) to: Option<MirrorSpec>,
}

/// One accepted change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct HistoryEntry {
    /// Generation this change produced.
    pub(crate) generation: u64,
    /// When, RFC 3339 UTC.
    pub(crate) at: String,
    /// What kind of change.
    pub(crate) action: Action,
    /// Weights before.
    pub(crate) from: Weights,
    /// Weights after.
    pub(crate) to: Weights,
    /// Free text given by the caller.
    pub(crate) reason: Option<String>,
    /// Token name, client address, or `config`.
    pub(crate) actor: String,
    /// For `pool` changes: which pool, old and new backends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) pool: Option<PoolChange>,
    /// For `rules` changes: rule names before and after.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) rules: Option<RulesChange>,
    /// For `mirror` changes: the mirror before and after.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) mirror: Option<MirrorChange>,
}

/// The dynamic state of one service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceState {
    /// Current weights.
    pub(crate) weights: Weights,
    /// Bumped by every accepted change.
    pub(crate) generation: u64,
    /// The pool last live at 100 % before the current state: where
    /// `rollback` goes.
    pub(crate) previous: Option<Color>,
    /// Blue and green.
    pub(crate) pools: Pools,
    /// Oldest first (the API shows newest first). May be left out of a
    /// value written to etcd by hand.
    #[serde(default)]
    pub(crate) history: History,
    /// Targeting rules (absent from state files written before them).
    #[serde(default)]
    pub(crate) rules: RulesState,
    /// Traffic mirroring (SPEC §9); `None`: off. Set only by commands
    /// (API, rollouts), never by the config file, so a reload keeps it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) mirror: Option<Box<MirrorSpec>>,
    /// Rollouts (SPEC §10), oldest first; the last one may be running.
    /// Written only by the service's rollout driver.
    #[serde(default, skip_serializing_if = "VecDeque::is_empty")]
    pub(crate) rollouts: VecDeque<Rollout>,
}

impl ServiceState {
    /// The running rollout, if one is.
    pub(crate) fn active_rollout(&self) -> Option<&Rollout> {
        self.rollouts.back().filter(|r| r.is_active())
    }
}

/// The two pools of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Pools {
    /// Blue pool.
    pub(crate) blue: PoolState,
    /// Green pool.
    pub(crate) green: PoolState,
}

impl Pools {
    /// One pool.
    pub(crate) fn get(&self, color: Color) -> &PoolState {
        match color {
            Color::Blue => &self.blue,
            Color::Green => &self.green,
        }
    }

    /// One pool, mutably.
    pub(crate) fn get_mut(&mut self, color: Color) -> &mut PoolState {
        match color {
            Color::Blue => &mut self.blue,
            Color::Green => &mut self.green,
        }
    }
}

/// The dynamic state of every service, by name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct RoutingState {
    /// By service name.
    pub(crate) services: BTreeMap<String, ServiceState>,
}

impl RoutingState {
    /// This state with `service` replaced by `next`: the other services
    /// as they are (the replaced one's old history is not copied only to
    /// be dropped).
    pub(crate) fn with_service(&self, service: &str, next: ServiceState) -> RoutingState {
        let mut services: BTreeMap<String, ServiceState> = self
            .services
            .iter()
            .filter(|(name, _)| name.as_str() != service)
            .map(|(name, s)| (name.clone(), s.clone()))
            .collect();
        services.insert(service.to_string(), next);
        RoutingState { services }
    }
}

/// Who asked for a change, why and when. Not part of the decision, except
/// `if_match`.
#[derive(Debug, Clone)]
pub(crate) struct ChangeMeta {
    /// Token name or client address.
    pub(crate) actor: String,
    /// Free text for history.
    pub(crate) reason: Option<String>,
    /// When the change was asked.
    pub(crate) at: SystemTime,
    /// `If-Match: "<generation>"`: refuse unless the generation is this one.
    pub(crate) if_match: Option<u64>,
}

/// A change to one service's routing.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// All traffic to `to`.
    Switch {
        /// Target pool.
        to: Color,
        /// Skip the healthy-backend gate.
        force: bool,
    },
    /// Set weights.
    Split {
        /// New weights.
        weights: Weights,
        /// Skip the healthy-backend gate.
        force: bool,
    },
    /// Back to the previous pool, or to the weights of a generation.
    Rollback {
        /// A generation still in history.
        to_generation: Option<u64>,
    },
    /// Replace a pool's backends.
    SetPool {
        /// The pool.
        color: Color,
        /// New backends (non-empty, no duplicates).
        backends: Vec<BackendAddr>,
        /// Allow replacing a pool that takes traffic.
        force: bool,
    },
    /// Replace the targeting rules.
    SetRules {
        /// The new list, in order (may be empty: no rules).
        rules: Vec<RuleSpec>,
    },
    /// Set (`Some`) or stop (`None`) traffic mirroring.
    SetMirror {
        /// The new mirror, checked by `apply`.
        mirror: Option<MirrorSpec>,
    },
    /// Bring the service in line with the config file just (re)loaded:
    /// `None` when the file no longer has it. A service new to the state
    /// starts from `initial`; a pool or rules list the file changed takes
    /// the file's (see [`PoolState::config`]). Weights never change.
    Reload {
        /// The service's section of the new config.
        service: Option<Box<ServiceConfig>>,
    },
    /// Take the service's state as the shared store (etcd, fleet mode) has
    /// it, written by another replica or by hand. Refused if it is invalid
    /// or older than the state served; `generation` stays the writer's.
    Adopt {
        /// The state read from the store.
        state: Box<ServiceState>,
    },
    /// Fleet mode: `replica` takes over the running rollout `id`, whose
    /// driver replica is gone (see [`Rollout::may_take_over`]). Decided
    /// against the driver the caller saw (`from`): if the record names
    /// another by now (a replica that won the race), nothing changes. The
    /// record alone changes (`driver`, a timeline entry): no generation,
    /// no history entry, no weight change.
    ClaimRollout {
        /// The rollout.
        id: String,
        /// The driver named when the caller decided.
        from: Option<String>,
        /// This replica.
        replica: String,
        /// The replicas with a presence key.
        live: Vec<String>,
    },
}

impl Command {
    /// The action recorded in history and metrics.
    pub(crate) fn action(&self) -> Action {
        match self {
            Command::Switch { .. } => Action::Switch,
            Command::Split { .. } => Action::Split,
            Command::Rollback { .. } => Action::Rollback,
            Command::SetPool { .. } => Action::Pool,
            Command::SetRules { .. } => Action::Rules,
            Command::SetMirror { .. } => Action::Mirror,
            // A reload records `pool` and `rules` entries of its own.
            Command::Reload { .. } => Action::Pool,
            Command::Adopt { state } => state.history.back().map_or(Action::Split, |e| e.action),
            // Never recorded: a claim changes no generation (see `apply`).
            Command::ClaimRollout { .. } => Action::Split,
        }
    }
}

/// Why a command was refused. The state is unchanged in every case.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub(crate) enum CommandError {
    /// No such service.
    #[error("unknown service `{0}`")]
    UnknownService(String),
    /// A field of the request is invalid.
    #[error("{field}: {message}")]
    BadField {
        /// The JSON field at fault.
        field: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// Target pool has no healthy backend (without `force`).
    #[error("pool {0} has no healthy backend (use \"force\": true to override)")]
    NoHealthyBackend(Color),
    /// Replacing a pool that serves traffic (without `force`).
    #[error("pool {color} takes {percent}% of traffic; switch away first or use \"force\": true")]
    PoolTakesTraffic {
        /// The pool.
        color: Color,
        /// Its current share.
        percent: f64,
    },
    /// `If-Match` is stale.
    #[error("generation is {current}, not {expected} (If-Match)")]
    StaleGeneration {
        /// What the caller expected.
        expected: u64,
        /// What it is.
        current: u64,
    },
    /// A rule is invalid (the first problem; the API names rule and condition).
    #[error("rules: {0}")]
    BadRule(RuleError),
    /// Nothing to roll back to.
    #[error("nothing to roll back to: no earlier state had one pool live at 100%")]
    NothingToRollBack,
    /// A manual switch, split or rollback while a rollout runs (SPEC §10).
    #[error("rollout {0} is running; pause, promote or abort it (or send \"force\": true, which aborts it first)")]
    RolloutActive(String),
    /// Fleet mode: the rollout's record names another replica as its
    /// driver (it took the rollout over); this replica must not write it.
    #[error("rollout {id} is driven by replica {driver} now")]
    RolloutDrivenElsewhere {
        /// The rollout.
        id: String,
        /// The replica that drives it.
        driver: String,
    },
}

/// Read-only facts `apply` needs about the running backends.
pub(crate) trait HealthView {
    /// Does the pool have at least one backend that can take traffic now?
    fn pool_has_healthy(&self, service: &str, color: Color) -> bool;
}

/// Every pool healthy (tests, and `check`).
#[cfg(test)]
pub(crate) struct AllHealthy;

#[cfg(test)]
impl HealthView for AllHealthy {
    fn pool_has_healthy(&self, _: &str, _: Color) -> bool {
        true
    }
}

/// The result of an accepted command.
#[derive(Debug, Clone, PartialEq)]
// Returned once per accepted change and unpacked at once, never stored:
// boxing it would only add an allocation.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Outcome {
    /// The service state changed (new generation, history appended).
    Changed(ServiceState),
    /// The command asked for what already is; nothing to persist.
    Unchanged,
    /// The service is gone (a reload whose config no longer has it).
    Removed,
}

/// Applies `cmd` to the service `name` in `state`. Pure: the result depends
/// only on the arguments, and a refusal changes nothing.
pub(crate) fn apply(
    state: &RoutingState,
    name: &str,
    cmd: &Command,
    meta: &ChangeMeta,
    health: &dyn HealthView,
) -> Result<Outcome, CommandError> {
    match cmd {
        Command::Reload { service } => {
            return Ok(reload(
                state.services.get(name),
                service.as_deref(),
                meta.at,
            ))
        }
        Command::Adopt { state: incoming } => {
            return adopt(state.services.get(name), incoming, meta.at)
        }
        Command::ClaimRollout {
            id,
            from,
            replica,
            live,
        } => {
            let current = state
                .services
                .get(name)
                .ok_or_else(|| CommandError::UnknownService(name.to_string()))?;
            return Ok(claim(current, id, from.as_deref(), replica, live, meta.at));
        }
        _ => {}
    }
    let current = state
        .services
        .get(name)
        .ok_or_else(|| CommandError::UnknownService(name.to_string()))?;
    if let Some(expected) = meta.if_match {
        if expected != current.generation {
            return Err(CommandError::StaleGeneration {
                expected,
                current: current.generation,
            });
        }
    }
    if matches!(
        cmd,
        Command::Switch { .. } | Command::Split { .. } | Command::Rollback { .. }
    ) {
        if let Some(r) = current.active_rollout() {
            return Err(CommandError::RolloutActive(r.id.clone()));
        }
    }
    let gate = |weights: Weights, force: bool| -> Result<(), CommandError> {
        if force {
            return Ok(());
        }
        for color in Color::ALL {
            if weights.bp(color) > current.weights.bp(color)
                && !health.pool_has_healthy(name, color)
            {
                return Err(CommandError::NoHealthyBackend(color));
            }
        }
        // Only a pool whose share grows is gated: moving traffic away from
        // a pool that went unhealthy must stay possible.
        Ok(())
    };

    let mut next = current.clone();
    let mut pool_change = None;
    let mut rules_change = None;
    let mut mirror_change = None;
    match cmd {
        Command::Switch { to, force } => {
            let w = Weights::full(*to);
            if w == current.weights {
                return Ok(Outcome::Unchanged);
            }
            gate(w, *force)?;
            next.weights = w;
        }
        Command::Split { weights, force } => {
            if *weights == current.weights {
                return Ok(Outcome::Unchanged);
            }
            gate(*weights, *force)?;
            next.weights = *weights;
        }
        Command::Rollback { to_generation } => {
            let w = match to_generation {
                Some(g) => {
                    let entry = current
                        .history
                        .iter()
                        .find(|e| e.generation == *g)
                        .ok_or_else(|| CommandError::BadField {
                            field: "to_generation",
                            message: match current.history.front() {
                                Some(oldest) => format!(
                                    "generation {g} is not in history (kept: {} to {})",
                                    oldest.generation, current.generation
                                ),
                                None => format!("generation {g} is not in history"),
                            },
                        })?;
                    entry.to
                }
                None => Weights::full(current.previous.ok_or(CommandError::NothingToRollBack)?),
            };
            if w == current.weights {
                return Ok(Outcome::Unchanged);
            }
            next.weights = w;
        }
        Command::SetPool {
            color,
            backends,
            force,
        } => {
            if backends.is_empty() {
                return Err(CommandError::BadField {
                    field: "backends",
                    message: "must not be empty".into(),
                });
            }
            for (i, b) in backends.iter().enumerate() {
                if backends[..i].contains(b) {
                    return Err(CommandError::BadField {
                        field: "backends",
                        message: format!("`{b}` is listed twice"),
                    });
                }
            }
            let pool = next.pools.get_mut(*color);
            if pool.backends == *backends {
                return Ok(Outcome::Unchanged);
            }
            if !force && current.weights.takes_traffic(*color) {
                return Err(CommandError::PoolTakesTraffic {
                    color: *color,
                    percent: current.weights.percent(*color),
                });
            }
            pool_change = Some(PoolChange {
                color: *color,
                from: std::mem::replace(&mut pool.backends, backends.clone()),
                to: backends.clone(),
            });
        }
        Command::SetRules { rules } => {
            if let Some(e) = check_rules(rules).into_iter().next() {
                return Err(CommandError::BadRule(e));
            }
            if current.rules.rules == *rules {
                return Ok(Outcome::Unchanged);
            }
            rules_change = Some(RulesChange::of(&current.rules.rules, rules));
            next.rules.rules.clone_from(rules);
        }
        Command::SetMirror { mirror } => {
            if let Some(spec) = mirror {
                spec.check().map_err(|e| CommandError::BadField {
                    field: e.field,
                    message: e.message,
                })?;
                if current.weights.bp(spec.to) == 10_000 {
                    return Err(CommandError::BadField {
                        field: "to",
                        message: format!(
                            "pool {} takes all traffic: no request would be copied (mirror to the idle pool)",
                            spec.to
                        ),
                    });
                }
            }
            if current.mirror.as_deref() == mirror.as_ref() {
                return Ok(Outcome::Unchanged);
            }
            mirror_change = Some(MirrorChange {
                from: current.mirror.as_deref().cloned(),
                to: mirror.clone(),
            });
            next.mirror = mirror.clone().map(Box::new);
        }
        Command::Reload { .. } | Command::Adopt { .. } | Command::ClaimRollout { .. } => {
            return Ok(Outcome::Unchanged)
        }
    }
    if let Live::Full(c) = current.weights.live() {
        if next.weights != current.weights {
            next.previous = Some(c);
        }
    }
    next.generation = current.generation + 1;
    let entry = HistoryEntry {
        generation: next.generation,
        at: humantime::format_rfc3339_seconds(meta.at).to_string(),
        action: cmd.action(),
        from: current.weights,
        to: next.weights,
        reason: meta.reason.clone(),
        actor: meta.actor.clone(),
        pool: pool_change,
        rules: rules_change,
        mirror: mirror_change,
    };
    push_history(&mut next, entry);
    Ok(Outcome::Changed(next))
}

pub(crate) fn push_history(state: &mut ServiceState, entry: HistoryEntry) {
    state.history.push(entry);
}

/// Brings `state` in line with `config`: services new to the config start
/// from `initial`, services gone from it are dropped, and a pool whose list
/// in the file changed since the state last saw it takes the file's list
/// (recorded as a `pool` change by `config`). Weights and generations of
/// existing services are kept. Pure, like [`apply`].
///
/// This is [`apply`] with [`Command::Reload`] for every service of the
/// config and of the state.
pub(crate) fn reconcile(state: &RoutingState, config: &Config, at: SystemTime) -> RoutingState {
    let mut out = RoutingState::default();
    let meta = ChangeMeta {
        actor: "config".into(),
        reason: None,
        at,
        if_match: None,
    };
    for svc in &config.services {
        let cmd = Command::Reload {
            service: Some(Box::new(svc.clone())),
        };
        match apply(state, &svc.name, &cmd, &meta, &NoGate) {
            Ok(Outcome::Changed(next)) => {
                out.services.insert(svc.name.clone(), next);
            }
            _ => {
                if let Some(cur) = state.services.get(&svc.name) {
                    out.services.insert(svc.name.clone(), cur.clone());
                }
            }
        }
    }
    out
}

/// Reloads never gate on health.
struct NoGate;

impl HealthView for NoGate {
    fn pool_has_healthy(&self, _: &str, _: Color) -> bool {
        true
    }
}

/// [`Command::Reload`] of one service.
fn reload(current: Option<&ServiceState>, svc: Option<&ServiceConfig>, at: SystemTime) -> Outcome {
    match (current, svc) {
        (None, None) => Outcome::Unchanged,
        (Some(_), None) => Outcome::Removed,
        (None, Some(svc)) => Outcome::Changed(initial_state(svc, at)),
        (Some(cur), Some(svc)) => {
            let next = reconcile_service(cur, svc, at);
            if next == *cur {
                Outcome::Unchanged
            } else {
                Outcome::Changed(next)
            }
        }
    }
}

/// [`Command::ClaimRollout`].
fn claim(
    current: &ServiceState,
    id: &str,
    from: Option<&str>,
    replica: &str,
    live: &[String],
    at: SystemTime,
) -> Outcome {
    let Some(r) = current.active_rollout().filter(|r| r.id == id) else {
        // Ended, or replaced by another rollout meanwhile.
        return Outcome::Unchanged;
    };
    if r.driver.as_deref() != from || !r.may_take_over(replica, live) {
        return Outcome::Unchanged;
    }
    let mut next = current.clone();
    if let Some(r) = next.rollouts.back_mut() {
        r.take_over(replica, &humantime::format_rfc3339_millis(at).to_string());
    }
    Outcome::Changed(next)
}

/// Do two states of a service differ in their rollout records only? The
/// driver persists its record (progress, a claim) without a new
/// generation.
pub(crate) fn rollouts_only(a: &ServiceState, b: &ServiceState) -> bool {
    a.generation == b.generation
        && a.weights == b.weights
        && a.previous == b.previous
        && a.pools == b.pools
        && a.history == b.history
        && a.rules == b.rules
        && a.mirror == b.mirror
}

/// [`Command::Adopt`]: the stored state, if it is valid and not older than
/// the one served. A value written by hand without history keeps the
/// served history and gains an entry saying so.
fn adopt(
    current: Option<&ServiceState>,
    incoming: &ServiceState,
    at: SystemTime,
) -> Result<Outcome, CommandError> {
    let bad = |field: &'static str, message: String| CommandError::BadField { field, message };
    if incoming.generation == 0 {
        return Err(bad("generation", "must be at least 1".into()));
    }
    for color in Color::ALL {
        let backends = &incoming.pools.get(color).backends;
        if backends.is_empty() {
            return Err(bad("pools", format!("{color}: no backend")));
        }
        for (i, b) in backends.iter().enumerate() {
            if backends[..i].contains(b) {
                return Err(bad("pools", format!("{color}: `{b}` is listed twice")));
            }
        }
    }
    if let Some(e) = check_rules(&incoming.rules.rules).into_iter().next() {
        return Err(CommandError::BadRule(e));
    }
    let mut next = incoming.clone();
    if let Some(cur) = current {
        if *cur == next {
            return Ok(Outcome::Unchanged);
        }
        // A rollout's driver saved its record (progress, a claim): the
        // same generation, everything else as served.
        if rollouts_only(cur, &next) {
            return Ok(Outcome::Changed(next));
        }
        if next.generation <= cur.generation {
            return Err(bad(
                "generation",
                format!(
                    "{} is not newer than the generation served ({})",
                    next.generation, cur.generation
                ),
            ));
        }
        if next.history.is_empty() {
            next.history = cur.history.clone();
            let action = if next.pools != cur.pools {
                Action::Pool
            } else if next.rules != cur.rules {
                Action::Rules
            } else if let Live::Full(_) = next.weights.live() {
                Action::Switch
            } else {
                Action::Split
            };
            let entry = HistoryEntry {
                generation: next.generation,
                at: humantime::format_rfc3339_seconds(at).to_string(),
                action,
                from: cur.weights,
                to: next.weights,
                reason: Some("written to the state store directly".into()),
                actor: "store".into(),
                pool: None,
                rules: None,
                mirror: None,
            };
            push_history(&mut next, entry);
        }
    }
    Ok(Outcome::Changed(next))
}

fn initial_state(svc: &ServiceConfig, at: SystemTime) -> ServiceState {
    let weights = Weights::full(svc.initial);
    let pool = |c: Color| PoolState {
        backends: svc.pool(c).to_vec(),
        config: svc.pool(c).to_vec(),
    };
    let mut state = ServiceState {
        weights,
        generation: 1,
        previous: None,
        pools: Pools {
            blue: pool(Color::Blue),
            green: pool(Color::Green),
        },
        history: History::default(),
        rules: RulesState {
            rules: svc.rules.clone(),
            config: svc.rules.clone(),
        },
        mirror: None,
        rollouts: VecDeque::new(),
    };
    push_history(
        &mut state,
        HistoryEntry {
            generation: 1,
            at: humantime::format_rfc3339_seconds(at).to_string(),
            action: Action::Init,
            from: weights,
            to: weights,
            reason: Some(format!("service added, initial pool {}", svc.initial)),
            actor: "config".into(),
            pool: None,
            rules: None,
            mirror: None,
        },
    );
    state
}

/// A change the config file made to a service (reload): a new generation
/// and a history entry by `config`. Weights are never changed by a reload.
fn record_config_change(
    next: &mut ServiceState,
    at: SystemTime,
    action: Action,
    pool: Option<PoolChange>,
    rules: Option<RulesChange>,
) {
    next.generation += 1;
    let entry = HistoryEntry {
        generation: next.generation,
        at: humantime::format_rfc3339_seconds(at).to_string(),
        action,
        from: next.weights,
        to: next.weights,
        reason: Some("config file changed".into()),
        actor: "config".into(),
        pool,
        rules,
        mirror: None,
    };
    push_history(next, entry);
}

fn reconcile_service(cur: &ServiceState, svc: &ServiceConfig, at: SystemTime) -> ServiceState {
    let mut next = cur.clone();
    for color in Color::ALL {
        let file = svc.pool(color);
        let pool = next.pools.get_mut(color);
        if pool.config.as_slice() == file {
            continue;
        }
        let from = std::mem::replace(&mut pool.backends, file.to_vec());
        pool.config = file.to_vec();
        if from.as_slice() == file {
            // The API had already set what the file now says.
            continue;
        }
        let pool = PoolChange {
            color,
            from,
            to: file.to_vec(),
        };
        record_config_change(&mut next, at, Action::Pool, Some(pool), None);
    }
    if next.rules.config != svc.rules {
        next.rules.config.clone_from(&svc.rules);
        if next.rules.rules != svc.rules {
            let change = RulesChange::of(&next.rules.rules, &svc.rules);
            next.rules.rules.clone_from(&svc.rules);
            record_config_change(&mut next, at, Action::Rules, None, Some(change));
        }
    }
    next
}

/// Backend lists as strings in JSON (`"10.0.0.7:8080"`, `"https://h:443"`).
mod addr_list {
    use super::*;

    pub(super) fn serialize<S: Serializer>(v: &[BackendAddr], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|a| a.to_string()))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Vec<BackendAddr>, D::Error> {
        let raw = Vec::<String>::deserialize(d)?;
        raw.iter()
            .map(|s| BackendAddr::parse(s).map_err(de::Error::custom))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> BackendAddr {
        BackendAddr::parse(s).expect("test address")
    }

    fn state() -> RoutingState {
        let mut s = RoutingState::default();
        let svc = ServiceState {
            weights: Weights::full(Color::Blue),
            generation: 1,
            previous: None,
            pools: Pools {
                blue: PoolState {
                    backends: vec![addr("127.0.0.1:1")],
                    config: vec![addr("127.0.0.1:1")],
                },
                green: PoolState {
                    backends: vec![addr("127.0.0.1:2")],
                    config: vec![addr("127.0.0.1:2")],
                },
            },
            history: History::default(),
            rules: RulesState::default(),
            mirror: None,
            rollouts: VecDeque::new(),
        };
        s.services.insert("web".into(), svc);
        s
    }

    fn meta() -> ChangeMeta {
        ChangeMeta {
            actor: "test".into(),
            reason: None,
            at: SystemTime::UNIX_EPOCH,
            if_match: None,
        }
    }

    fn run(s: &mut RoutingState, cmd: Command) -> Result<Outcome, CommandError> {
        let out = apply(s, "web", &cmd, &meta(), &AllHealthy)?;
        if let Outcome::Changed(ref n) = out {
            s.services.insert("web".into(), n.clone());
        }
        Ok(out)
    }

    struct NoneHealthy;
    impl HealthView for NoneHealthy {
        fn pool_has_healthy(&self, _: &str, _: Color) -> bool {
            false
        }
    }

    #[test]
    fn bucket_picks_green_below_share() {
        let w = Weights::from_green_percent(10.0).expect("valid");
        assert_eq!(w.pick(0), Color::Green);
        assert_eq!(w.pick(999), Color::Green);
        assert_eq!(w.pick(1000), Color::Blue);
        assert_eq!(w.pick(9999), Color::Blue);
        assert_eq!(Weights::full(Color::Blue).pick(0), Color::Blue);
        assert_eq!(Weights::full(Color::Green).pick(9999), Color::Green);
    }

    #[test]
    fn ramp_only_moves_clients_blue_to_green() {
        let steps = [5.0, 25.0, 50.0, 100.0];
        for bucket in 0..10_000u16 {
            let mut was_green = false;
            for pct in steps {
                let g = Weights::from_green_percent(pct)
                    .expect("valid")
                    .pick(bucket)
                    == Color::Green;
                assert!(
                    g || !was_green,
                    "bucket {bucket} went back to blue at {pct}"
                );
                was_green = g;
            }
        }
    }

    #[test]
    fn percent_parsing_and_json() {
        assert!(Weights::from_green_percent(150.0).is_err());
        assert!(Weights::from_green_percent(-1.0).is_err());
        assert!(Weights::from_green_percent(f64::NAN).is_err());
        assert!(Weights::from_green_percent(12.345).is_err());
        let w = Weights::from_green_percent(12.5).expect("valid");
        assert_eq!(w.green_bp(), 1250);
        assert_eq!(
            serde_json::to_string(&w).expect("json"),
            r#"{"blue":87.5,"green":12.5}"#
        );
        let w: Weights = serde_json::from_str(r#"{"blue":90,"green":10}"#).expect("json");
        assert_eq!(w.green_bp(), 1000);
        assert!(serde_json::from_str::<Weights>(r#"{"blue":50,"green":10}"#).is_err());
    }

    #[test]
    fn switch_bumps_generation_and_records_history() {
        let mut s = state();
        run(
            &mut s,
            Command::Switch {
                to: Color::Green,
                force: false,
            },
        )
        .expect("switch");
        let svc = &s.services["web"];
        assert_eq!(svc.weights, Weights::full(Color::Green));
        assert_eq!(svc.generation, 2);
        assert_eq!(svc.previous, Some(Color::Blue));
        let last = svc.history.back().expect("history");
        assert_eq!(last.action, Action::Switch);
        assert_eq!(last.from, Weights::full(Color::Blue));
        assert_eq!(last.to, Weights::full(Color::Green));
    }

    #[test]
    fn same_switch_is_unchanged() {
        let mut s = state();
        let out = run(
            &mut s,
            Command::Switch {
                to: Color::Blue,
                force: false,
            },
        )
        .expect("ok");
        assert_eq!(out, Outcome::Unchanged);
        assert_eq!(s.services["web"].generation, 1);
    }

    #[test]
    fn rollback_undoes_cutover_and_aborts_canary() {
        let mut s = state();
        assert_eq!(
            run(
                &mut s,
                Command::Rollback {
                    to_generation: None
                }
            ),
            Err(CommandError::NothingToRollBack)
        );
        run(
            &mut s,
            Command::Switch {
                to: Color::Green,
                force: false,
            },
        )
        .expect("switch");
        run(
            &mut s,
            Command::Rollback {
                to_generation: None,
            },
        )
        .expect("rollback");
        assert_eq!(s.services["web"].weights, Weights::full(Color::Blue));
        // Canary from blue: 10 %, 50 %, then abort.
        for pct in [10.0, 50.0] {
            let w = Weights::from_green_percent(pct).expect("valid");
            run(
                &mut s,
                Command::Split {
                    weights: w,
                    force: false,
                },
            )
            .expect("split");
        }
        run(
            &mut s,
            Command::Rollback {
                to_generation: None,
            },
        )
        .expect("rollback");
        assert_eq!(s.services["web"].weights, Weights::full(Color::Blue));
        // Rollback to a generation.
        run(
            &mut s,
            Command::Rollback {
                to_generation: Some(5),
            },
        )
        .expect("to generation");
        assert_eq!(s.services["web"].weights.green_bp(), 5000);
        let err = run(
            &mut s,
            Command::Rollback {
                to_generation: Some(99),
            },
        );
        assert!(matches!(
            err,
            Err(CommandError::BadField {
                field: "to_generation",
                ..
            })
        ));
    }

    #[test]
    fn gates_refuse_and_change_nothing() {
        let s = state();
        let cmd = Command::Switch {
            to: Color::Green,
            force: false,
        };
        assert_eq!(
            apply(&s, "web", &cmd, &meta(), &NoneHealthy),
            Err(CommandError::NoHealthyBackend(Color::Green))
        );
        let forced = Command::Switch {
            to: Color::Green,
            force: true,
        };
        assert!(apply(&s, "web", &forced, &meta(), &NoneHealthy).is_ok());
        let pool = Command::SetPool {
            color: Color::Blue,
            backends: vec![addr("127.0.0.1:9")],
            force: false,
        };
        assert!(matches!(
            apply(&s, "web", &pool, &meta(), &AllHealthy),
            Err(CommandError::PoolTakesTraffic {
                color: Color::Blue,
                ..
            })
        ));
        let mut m = meta();
        m.if_match = Some(7);
        assert_eq!(
            apply(&s, "web", &cmd, &m, &AllHealthy),
            Err(CommandError::StaleGeneration {
                expected: 7,
                current: 1
            })
        );
        assert_eq!(
            apply(&s, "nope", &cmd, &meta(), &AllHealthy),
            Err(CommandError::UnknownService("nope".into()))
        );
        assert_eq!(s, state());
    }

    #[test]
    fn set_pool_validates_and_records() {
        let mut s = state();
        let dup = Command::SetPool {
            color: Color::Green,
            backends: vec![addr("127.0.0.1:9"), addr("127.0.0.1:9")],
            force: false,
        };
        assert!(matches!(
            run(&mut s, dup),
            Err(CommandError::BadField {
                field: "backends",
                ..
            })
        ));
        let empty = Command::SetPool {
            color: Color::Green,
            backends: vec![],
            force: false,
        };
        assert!(matches!(
            run(&mut s, empty),
            Err(CommandError::BadField {
                field: "backends",
                ..
            })
        ));
        let ok = Command::SetPool {
            color: Color::Green,
            backends: vec![addr("127.0.0.1:9")],
            force: false,
        };
        run(&mut s, ok).expect("set pool");
        let svc = &s.services["web"];
        assert_eq!(svc.pools.green.backends, vec![addr("127.0.0.1:9")]);
        assert_eq!(svc.generation, 2);
        assert_eq!(svc.previous, None, "pool changes do not move traffic");
    }

    #[test]
    fn set_rules_validates_records_and_reconciles() {
        let rule = |name: &str, c: &str| RuleSpec {
            name: name.into(),
            conditions: vec![c.into()],
            to: Color::Green,
            fallback: false,
        };
        let mut s = state();
        let bad = Command::SetRules {
            rules: vec![rule("beta", "client:10.0.0.0/33")],
        };
        assert!(matches!(run(&mut s, bad), Err(CommandError::BadRule(_))));
        assert_eq!(s, state());
        let good = vec![rule("beta", "cookie:plan=pro")];
        run(
            &mut s,
            Command::SetRules {
                rules: good.clone(),
            },
        )
        .expect("rules");
        let svc = &s.services["web"];
        assert_eq!((svc.generation, &svc.rules.rules), (2, &good));
        let last = svc.history.back().expect("history");
        assert_eq!(last.action, Action::Rules);
        assert_eq!(
            last.rules.as_ref().map(|r| r.to.clone()),
            Some(vec!["beta".to_string()])
        );
        // A state file from before rules loads with none.
        let mut json = serde_json::to_value(&s.services["web"]).expect("json");
        if let Some(o) = json.as_object_mut() {
            o.remove("rules");
        }
        let old: ServiceState = serde_json::from_value(json).expect("old state loads");
        assert!(old.rules.rules.is_empty());
        // Unchanged file: the API's rules stand; changed file: it wins.
        let mut cfg = crate::config::Config::demo(
            "127.0.0.1:1".parse().expect("addr"),
            "127.0.0.1:2".parse().expect("addr"),
        );
        cfg.services[0].name = "web".into();
        let r = reconcile(&s, &cfg, SystemTime::UNIX_EPOCH);
        assert_eq!(r.services["web"].rules.rules, good);
        cfg.services[0].rules = vec![rule("office", "client:10.0.0.0/8")];
        let r = reconcile(&s, &cfg, SystemTime::UNIX_EPOCH);
        assert_eq!(r.services["web"].rules.rules, cfg.services[0].rules);
        assert_eq!(r.services["web"].generation, 3);
    }

    #[test]
    fn set_mirror_validates_records_and_survives_reload_and_json() {
        let mut s = state();
        let mut spec = MirrorSpec::new(Color::Blue, 1000);
        let refused = run(
            &mut s,
            Command::SetMirror {
                mirror: Some(spec.clone()),
            },
        );
        assert!(
            matches!(refused, Err(CommandError::BadField { field: "to", .. })),
            "blue is live: {refused:?}"
        );
        spec.to = Color::Green;
        spec.max_inflight = 0;
        let refused = run(
            &mut s,
            Command::SetMirror {
                mirror: Some(spec.clone()),
            },
        );
        assert!(matches!(
            refused,
            Err(CommandError::BadField {
                field: "max_inflight",
                ..
            })
        ));
        assert_eq!(s, state(), "refusals change nothing");
        spec.max_inflight = 8;
        let set = Command::SetMirror {
            mirror: Some(spec.clone()),
        };
        run(&mut s, set.clone()).expect("mirror");
        assert_eq!(run(&mut s, set), Ok(Outcome::Unchanged));
        let svc = &s.services["web"];
        assert_eq!((svc.generation, svc.mirror.as_deref()), (2, Some(&spec)));
        let last = svc.history.back().expect("history");
        assert_eq!(last.action, Action::Mirror);
        assert_eq!(
            last.mirror
                .as_ref()
                .map(|m| (m.from.is_none(), m.to.is_some())),
            Some((true, true))
        );
        // Persisted form round-trips; a state file without it loads as off.
        let json = serde_json::to_value(svc).expect("json");
        let back: ServiceState = serde_json::from_value(json.clone()).expect("back");
        assert_eq!(&back, svc);
        let mut old = json;
        if let Some(o) = old.as_object_mut() {
            o.remove("mirror");
        }
        let old: ServiceState = serde_json::from_value(old).expect("old state loads");
        assert!(old.mirror.is_none());
        // A reload keeps it.
        let mut cfg = crate::config::Config::demo(
            "127.0.0.1:1".parse().expect("addr"),
            "127.0.0.1:2".parse().expect("addr"),
        );
        cfg.services[0].name = "web".into();
        let r = reconcile(&s, &cfg, SystemTime::UNIX_EPOCH);
        assert_eq!(r.services["web"].mirror.as_deref(), Some(&spec));
        run(&mut s, Command::SetMirror { mirror: None }).expect("off");
        assert!(s.services["web"].mirror.is_none());
        assert_eq!(s.services["web"].generation, 3);
    }

    #[test]
    fn reconcile_latest_writer_wins() {
        let mut s = state();
        run(
            &mut s,
            Command::SetPool {
                color: Color::Green,
                backends: vec![addr("127.0.0.1:9")],
                force: false,
            },
        )
        .expect("set pool");
        let mut cfg = crate::config::Config::demo(
            "127.0.0.1:1".parse().expect("addr"),
            "127.0.0.1:2".parse().expect("addr"),
        );
        cfg.services[0].name = "web".into();
        // Unchanged file: the API's list stands.
        let r = reconcile(&s, &cfg, SystemTime::UNIX_EPOCH);
        assert_eq!(
            r.services["web"].pools.green.backends,
            vec![addr("127.0.0.1:9")]
        );
        // File changed: the file wins, with a history entry.
        cfg.services[0].green = vec![addr("127.0.0.1:3")];
        let r = reconcile(&s, &cfg, SystemTime::UNIX_EPOCH);
        assert_eq!(
            r.services["web"].pools.green.backends,
            vec![addr("127.0.0.1:3")]
        );
        assert_eq!(r.services["web"].generation, 3);
        // New service appears, removed one disappears.
        cfg.services[0].name = "other".into();
        let r = reconcile(&s, &cfg, SystemTime::UNIX_EPOCH);
        assert!(r.services.contains_key("other") && !r.services.contains_key("web"));
        assert_eq!(r.services["other"].generation, 1);
    }
    /// Issue 13 item 8: a claim through `apply` names the new driver only
    /// if the one the caller saw is gone and still named; a loser of the
    /// race, deciding again on the winner's record, changes nothing. The
    /// record (same generation) is then adopted by the other replicas.
    #[test]
    fn a_rollout_is_claimed_once_from_a_dead_driver() {
        use crate::control_plane::rollout::plan::Plan;
        let plan = Plan::from_json(&serde_json::json!({"steps": [
            {"weight": 20, "pause": "1m"}, {"weight": 100}
        ]}))
        .expect("plan");
        let mut st = state();
        let mut r = Rollout::start("web-1".into(), "web".into(), plan, Color::Green, "t0");
        r.driver = Some("a".into());
        r.step_elapsed_ms = 7000;
        if let Some(svc) = st.services.get_mut("web") {
            svc.rollouts.push_back(r);
        }
        let live = vec!["b".to_string(), "c".to_string()];
        let claim = |by: &str, from: &str| Command::ClaimRollout {
            id: "web-1".into(),
            from: Some(from.into()),
            replica: by.into(),
            live: live.clone(),
        };
        let Ok(Outcome::Changed(won)) = apply(&st, "web", &claim("b", "a"), &meta(), &AllHealthy)
        else {
            panic!("b claims");
        };
        let held = won.rollouts.back().expect("record");
        assert_eq!(held.driver.as_deref(), Some("b"));
        assert_eq!((held.step, held.step_elapsed_ms), (0, 7000));
        assert_eq!(won.generation, 1, "no new generation");
        assert_eq!(won.history, st.services["web"].history, "no history entry");
        // c decided on the same view (driver a) but b won: nothing.
        let after = st.with_service("web", won.clone());
        assert_eq!(
            apply(&after, "web", &claim("c", "a"), &meta(), &AllHealthy),
            Ok(Outcome::Unchanged)
        );
        // Nor does anyone claim from b, which is live.
        assert_eq!(
            apply(&after, "web", &claim("c", "b"), &meta(), &AllHealthy),
            Ok(Outcome::Unchanged)
        );
        // The other replicas adopt the record saved without a generation.
        let adopt = Command::Adopt {
            state: Box::new(won.clone()),
        };
        assert_eq!(
            apply(&st, "web", &adopt, &meta(), &AllHealthy),
            Ok(Outcome::Changed(won.clone()))
        );
        // But not a same-generation value that changes routing.
        let mut forged = won;
        forged.weights = Weights::full(Color::Green);
        let adopt = Command::Adopt {
            state: Box::new(forged),
        };
        assert!(apply(&st, "web", &adopt, &meta(), &AllHealthy).is_err());
    }
}
