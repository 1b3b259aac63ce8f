//! Rollout plans (SPEC §10): the steps, the analysis settings, and the one
//! parser that reads them from a JSON value, used for inline plans (the API)
//! and for `[[rollout_plan]]` tables (the config parser converts the TOML
//! table to JSON and maps an error's path back to a line).

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{json, Map, Value};

/// Most steps a plan may have.
pub(crate) const MAX_STEPS: usize = 64;

/// One step of a plan.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Step {
    /// Move the canary to `weight_bp` basis points, then hold for `pause`
    /// (and until the step has seen its minimum of canary requests).
    Weight {
        /// Canary share in basis points (1..=10000).
        weight_bp: u16,
        /// Observation time at this weight (zero: pass as soon as the
        /// minimum of requests is in).
        pause: Duration,
        /// Overrides the plan's `min_requests` for this step.
        min_requests: Option<u64>,
    },
    /// Wait for `promote`.
    Gate {
        /// Shown in `reason` while it waits.
        name: String,
    },
    /// Copy `percent` % of the live traffic to the canary for `duration`;
    /// the canary's weight stays 0.
    Mirror {
        /// Share of requests copied (0.01..=100).
        percent: f64,
        /// How long the step lasts.
        duration: Duration,
    },
}

impl Step {
    /// The step as it is written in a plan (`{"weight":1,"pause":"1m"}`).
    pub(crate) fn to_json(&self) -> Value {
        match self {
            Step::Weight {
                weight_bp,
                pause,
                min_requests,
            } => {
                let mut m = Map::new();
                m.insert("weight".into(), percent_json(*weight_bp));
                if !pause.is_zero() {
                    m.insert("pause".into(), Value::from(fmt_duration(*pause)));
                }
                if let Some(n) = min_requests {
                    m.insert("min_requests".into(), Value::from(*n));
                }
                Value::Object(m)
            }
            Step::Gate { name } => json!({ "gate": name }),
            Step::Mirror { percent, duration } => {
                json!({ "mirror": percent, "duration": fmt_duration(*duration) })
            }
        }
    }
}

/// Failure kinds the analysis counts (`failures = [...]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Failures {
    /// Responses with a 5xx status from the backend.
    pub(crate) status_5xx: bool,
    /// Transport failures: connect, timeout, reset (and tls), i.e. the
    /// proxy's own 502/503/504 and bodies cut short.
    pub(crate) transport: bool,
}

/// `[rollout_plan.analysis]`, with SPEC §10's defaults.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct AnalysisConfig {
    /// Canary failure rate may be at most this × the baseline's (≥ 1).
    pub(crate) max_error_ratio: f64,
    /// ...and never above this ratio (0 < x ≤ 1).
    pub(crate) max_error_abs: f64,
    /// Canary p99 ≤ this × baseline p99 + `latency_slack` (≥ 1).
    pub(crate) max_latency_ratio: f64,
    /// Added to the latency bound.
    pub(crate) latency_slack: Duration,
    /// Canary requests a step needs before it may pass.
    pub(crate) min_requests: u64,
    /// Bound on false rollbacks per rule and step (0 < α < 0.5).
    pub(crate) alpha: f64,
    /// What counts as a failure.
    pub(crate) failures: Failures,
    /// The names given in `failures`, as written.
    pub(crate) failure_names: Vec<String>,
}

impl Default for AnalysisConfig {
    fn default() -> Self {
        AnalysisConfig {
            max_error_ratio: 1.5,
            max_error_abs: 0.05,
            max_latency_ratio: 1.25,
            latency_slack: Duration::from_millis(5),
            min_requests: 100,
            alpha: 0.001,
            failures: Failures {
                status_5xx: true,
                transport: true,
            },
            failure_names: ["5xx", "connect", "timeout", "reset"]
                .map(String::from)
                .to_vec(),
        }
    }
}

/// A validated plan.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Plan {
    /// `name` of a `[[rollout_plan]]` (None for an inline plan without one).
    pub(crate) name: Option<String>,
    /// The steps, in order.
    pub(crate) steps: Vec<Step>,
    /// The analysis settings.
    pub(crate) analysis: AnalysisConfig,
}

/// A problem in a plan: where (`steps[2].weight`) and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PlanError {
    /// Path of the key at fault inside the plan (empty: the plan itself).
    pub(crate) path: String,
    /// What is wrong.
    pub(crate) message: String,
}

impl fmt::Display for PlanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

fn err(path: impl Into<String>, message: impl Into<String>) -> PlanError {
    PlanError {
        path: path.into(),
        message: message.into(),
    }
}

const PLAN_KEYS: &[&str] = &["name", "steps", "analysis"];
const ANALYSIS_KEYS: &[&str] = &[
    "max_error_ratio",
    "max_error_abs",
    "max_latency_ratio",
    "latency_slack",
    "min_requests",
    "alpha",
    "failures",
];

fn unknown_keys(m: &Map<String, Value>, known: &[&str], path: &str, out: &mut Vec<PlanError>) {
    for k in m.keys() {
        if !known.contains(&k.as_str()) {
            let at = if path.is_empty() {
                k.clone()
            } else {
                format!("{path}.{k}")
            };
            out.push(err(
                at,
                format!("unknown key (expected one of: {})", known.join(", ")),
            ));
        }
    }
}

/// `[a-z0-9_-]+`, at most 64 characters.
pub(crate) fn check_name(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid name {s:?} (lowercase letters, digits, `_` and `-`, at most 64)"
        ))
    }
}

fn number(v: &Value) -> Option<f64> {
    v.as_f64().filter(|f| f.is_finite())
}

fn duration(v: &Value, path: &str, zero_ok: bool) -> Result<Duration, PlanError> {
    let Some(s) = v.as_str() else {
        return Err(err(
            path,
            format!("expected a duration string like \"2m\", got {v}"),
        ));
    };
    match humantime::parse_duration(s) {
        Ok(d) if d.is_zero() && !zero_ok => Err(err(path, "must be greater than 0")),
        Ok(d) if d > Duration::from_secs(7 * 24 * 3600) => Err(err(path, "longer than 7 days")),
        Ok(d) => Ok(d),
        Err(_) => Err(err(
            path,
            format!("invalid duration {s:?} (expected e.g. \"250ms\", \"2s\", \"5m\")"),
        )),
    }
}

/// Percent (0, 100] with at most two decimals → basis points.
fn percent_bp(v: &Value, path: &str) -> Result<u16, PlanError> {
    let Some(p) = number(v) else {
        return Err(err(
            path,
            format!("expected a number from 0.01 to 100, got {v}"),
        ));
    };
    if p <= 0.0 || p > 100.0 {
        return Err(err(
            path,
            format!("must be more than 0 and at most 100, got {p}"),
        ));
    }
    let bp = (p * 100.0).round();
    if (bp - p * 100.0).abs() > 1e-6 {
        return Err(err(
            path,
            format!("at most two decimals (0.01 % steps), got {p}"),
        ));
    }
    // In 1..=10000 by the checks above.
    Ok(bp as u16)
}

fn percent_json(bp: u16) -> Value {
    if bp % 100 == 0 {
        Value::from(bp / 100)
    } else {
        Value::from(f64::from(bp) / 100.0)
    }
}

/// `"1m"`, `"250ms"`: what humantime prints, which it also parses.
pub(crate) fn fmt_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string().replace(' ', "")
}

impl Plan {
    /// Reads and validates a plan from JSON (inline plans, and
    /// `[[rollout_plan]]` tables converted to JSON). Every problem found is
    /// returned, each with its path.
    pub(crate) fn from_json(v: &Value) -> Result<Plan, Vec<PlanError>> {
        let mut errors = Vec::new();
        let Some(m) = v.as_object() else {
            return Err(vec![err("", format!("a plan is an object, got {v}"))]);
        };
        unknown_keys(m, PLAN_KEYS, "", &mut errors);
        let name = match m.get("name") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => match check_name(s) {
                Ok(()) => Some(s.clone()),
                Err(e) => {
                    errors.push(err("name", e));
                    None
                }
            },
            Some(v) => {
                errors.push(err("name", format!("expected a string, got {v}")));
                None
            }
        };
        let analysis = match m.get("analysis") {
            None => AnalysisConfig::default(),
            Some(Value::Object(a)) => parse_analysis(a, &mut errors),
            Some(v) => {
                errors.push(err("analysis", format!("expected a table, got {v}")));
                AnalysisConfig::default()
            }
        };
        let steps = match m.get("steps") {
            None => {
                errors.push(err("steps", "missing (required)"));
                Vec::new()
            }
            Some(Value::Array(items)) => parse_steps(items, &mut errors),
            Some(v) => {
                errors.push(err("steps", format!("expected an array of steps, got {v}")));
                Vec::new()
            }
        };
        if errors.is_empty() {
            Ok(Plan {
                name,
                steps,
                analysis,
            })
        } else {
            Err(errors)
        }
    }

    /// The plan as JSON, in the form [`Plan::from_json`] reads.
    pub(crate) fn to_json(&self) -> Value {
        let a = &self.analysis;
        let mut m = Map::new();
        if let Some(n) = &self.name {
            m.insert("name".into(), Value::from(n.clone()));
        }
        m.insert(
            "steps".into(),
            Value::Array(self.steps.iter().map(Step::to_json).collect()),
        );
        m.insert(
            "analysis".into(),
            json!({
                "max_error_ratio": a.max_error_ratio,
                "max_error_abs": a.max_error_abs,
                "max_latency_ratio": a.max_latency_ratio,
                "latency_slack": fmt_duration(a.latency_slack),
                "min_requests": a.min_requests,
                "alpha": a.alpha,
                "failures": a.failure_names,
            }),
        );
        Value::Object(m)
    }

    /// Canary requests step `i` needs before it may pass.
    pub(crate) fn min_requests(&self, i: usize) -> u64 {
        match self.steps.get(i) {
            Some(Step::Weight {
                min_requests: Some(n),
                ..
            }) => *n,
            _ => self.analysis.min_requests,
        }
    }
}

fn parse_analysis(a: &Map<String, Value>, errors: &mut Vec<PlanError>) -> AnalysisConfig {
    unknown_keys(a, ANALYSIS_KEYS, "analysis", errors);
    let mut c = AnalysisConfig::default();
    let mut num = |key: &str, ok: &dyn Fn(f64) -> bool, what: &str| -> Option<f64> {
        let v = a.get(key)?;
        let path = format!("analysis.{key}");
        match number(v) {
            Some(f) if ok(f) => Some(f),
            _ => {
                errors.push(err(path, format!("expected {what}, got {v}")));
                None
            }
        }
    };
    if let Some(f) = num(
        "max_error_ratio",
        &|f| (1.0..=1000.0).contains(&f),
        "a number from 1 to 1000",
    ) {
        c.max_error_ratio = f;
    }
    if let Some(f) = num(
        "max_error_abs",
        &|f| f > 0.0 && f <= 1.0,
        "a ratio above 0 and at most 1",
    ) {
        c.max_error_abs = f;
    }
    if let Some(f) = num(
        "max_latency_ratio",
        &|f| (1.0..=1000.0).contains(&f),
        "a number from 1 to 1000",
    ) {
        c.max_latency_ratio = f;
    }
    if let Some(f) = num(
        "alpha",
        &|f| f > 0.0 && f < 0.5,
        "a probability above 0 and below 0.5",
    ) {
        c.alpha = f;
    }
    if let Some(v) = a.get("min_requests") {
        match v.as_u64() {
            Some(n) if n <= 100_000_000 => c.min_requests = n,
            _ => errors.push(err(
                "analysis.min_requests",
                format!("expected an integer from 0 to 100000000, got {v}"),
            )),
        }
    }
    if let Some(v) = a.get("latency_slack") {
        match duration(v, "analysis.latency_slack", true) {
            Ok(d) => c.latency_slack = d,
            Err(e) => errors.push(e),
        }
    }
    if let Some(v) = a.get("failures") {
        match v.as_array() {
            Some(list) if !list.is_empty() => {
                let mut f = Failures {
                    status_5xx: false,
                    transport: false,
                };
                let mut names = Vec::new();
                for (i, item) in list.iter().enumerate() {
                    let path = format!("analysis.failures[{i}]");
                    match item.as_str() {
                        Some("5xx") => f.status_5xx = true,
                        Some("connect" | "timeout" | "reset" | "tls") => f.transport = true,
                        _ => {
                            errors.push(err(
                                path,
                                format!("expected \"5xx\", \"connect\", \"timeout\", \"reset\" or \"tls\", got {item}"),
                            ));
                            continue;
                        }
                    }
                    if let Some(s) = item.as_str() {
                        if names.iter().any(|n: &String| n == s) {
                            errors.push(err(path, format!("{s:?} is listed twice")));
                        }
                        names.push(s.to_string());
                    }
                }
                c.failures = f;
                c.failure_names = names;
            }
            _ => errors.push(err(
                "analysis.failures",
                format!("expected a non-empty array of strings, got {v}"),
            )),
        }
    }
    c
}

fn parse_steps(items: &[Value], errors: &mut Vec<PlanError>) -> Vec<Step> {
    if items.is_empty() {
        errors.push(err("steps", "must not be empty"));
        return Vec::new();
    }
    if items.len() > MAX_STEPS {
        errors.push(err("steps", format!("more than {MAX_STEPS} steps")));
        return Vec::new();
    }
    let mut steps = Vec::new();
    let mut last_weight: Option<(u16, usize)> = None;
    for (i, item) in items.iter().enumerate() {
        let path = format!("steps[{i}]");
        let Some(m) = item.as_object() else {
            errors.push(err(
                path,
                format!("expected a table like {{ weight = 10, pause = \"1m\" }}, got {item}"),
            ));
            continue;
        };
        let kinds: Vec<&str> = ["weight", "gate", "mirror"]
            .into_iter()
            .filter(|k| m.contains_key(*k))
            .collect();
        let step = match kinds.as_slice() {
            ["weight"] => {
                unknown_keys(m, &["weight", "pause", "min_requests"], &path, errors);
                let w = percent_bp(&m["weight"], &format!("{path}.weight"));
                let pause = m
                    .get("pause")
                    .map(|v| duration(v, &format!("{path}.pause"), false))
                    .transpose();
                let min_requests = match m.get("min_requests") {
                    None => Ok(None),
                    Some(v) => v
                        .as_u64()
                        .filter(|n| *n <= 100_000_000)
                        .map(Some)
                        .ok_or_else(|| {
                            err(
                                format!("{path}.min_requests"),
                                format!("expected an integer from 0 to 100000000, got {v}"),
                            )
                        }),
                };
                match (w, pause, min_requests) {
                    (Ok(weight_bp), Ok(pause), Ok(min_requests)) => {
                        if let Some((prev, j)) = last_weight {
                            if weight_bp < prev {
                                errors.push(err(
                                    format!("{path}.weight"),
                                    format!(
                                        "{} is below steps[{j}]'s {}: weights never decrease (sticky clients only move to the canary)",
                                        percent_json(weight_bp),
                                        percent_json(prev)
                                    ),
                                ));
                            }
                        }
                        last_weight = Some((weight_bp, i));
                        Some(Step::Weight {
                            weight_bp,
                            pause: pause.unwrap_or(Duration::ZERO),
                            min_requests,
                        })
                    }
                    (w, p, n) => {
                        errors.extend(w.err());
                        errors.extend(p.err());
                        errors.extend(n.err());
                        None
                    }
                }
            }
            ["gate"] => {
                unknown_keys(m, &["gate"], &path, errors);
                match m["gate"].as_str().map(|s| (s, check_name(s))) {
                    Some((s, Ok(()))) => Some(Step::Gate {
                        name: s.to_string(),
                    }),
                    Some((_, Err(e))) => {
                        errors.push(err(format!("{path}.gate"), e));
                        None
                    }
                    None => {
                        errors.push(err(
                            format!("{path}.gate"),
                            format!("expected a name, got {}", m["gate"]),
                        ));
                        None
                    }
                }
            }
            ["mirror"] => {
                unknown_keys(m, &["mirror", "duration"], &path, errors);
                if let Some((_, j)) = last_weight {
                    errors.push(err(
                        path.clone(),
                        format!("a mirror step runs only while the canary's weight is 0, but steps[{j}] already moved traffic"),
                    ));
                }
                let p = percent_bp(&m["mirror"], &format!("{path}.mirror"));
                let d = match m.get("duration") {
                    None => Err(err(
                        format!("{path}.duration"),
                        "missing (required for a mirror step)",
                    )),
                    Some(v) => duration(v, &format!("{path}.duration"), false),
                };
                match (p, d) {
                    (Ok(bp), Ok(duration)) => Some(Step::Mirror {
                        percent: f64::from(bp) / 100.0,
                        duration,
                    }),
                    (p, d) => {
                        errors.extend(p.err());
                        errors.extend(d.err());
                        None
                    }
                }
            }
            [] => {
                errors.push(err(
                    path,
                    "a step needs one of `weight`, `gate` or `mirror`",
                ));
                None
            }
            _ => {
                errors.push(err(
                    path,
                    format!(
                        "a step has one of `weight`, `gate` or `mirror`, not {}",
                        kinds.join(" and ")
                    ),
                ));
                None
            }
        };
        steps.extend(step);
    }
    match last_weight {
        None => errors.push(err("steps", "no weight step: a plan must end at { weight = 100 }")),
        Some((bp, j)) if bp != 10_000 => errors.push(err(
            format!("steps[{j}].weight"),
            "the last weight step must be 100 (the canary takes all traffic when the rollout succeeds)",
        )),
        Some(_) => {}
    }
    steps
}

impl Serialize for Plan {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_json().serialize(s)
    }
}

impl<'de> Deserialize<'de> for Plan {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Plan, D::Error> {
        let v = Value::deserialize(d)?;
        Plan::from_json(&v).map_err(|errors| {
            let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
            serde::de::Error::custom(format!("invalid plan: {}", text.join("; ")))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(v: Value) -> Result<Plan, Vec<PlanError>> {
        Plan::from_json(&v)
    }

    #[test]
    fn spec_example_parses_and_round_trips() {
        let p = plan(json!({
            "name": "standard",
            "steps": [
                {"mirror": 100, "duration": "2m"},
                {"weight": 1, "pause": "1m"},
                {"weight": 10, "pause": "2m"},
                {"gate": "approve"},
                {"weight": 50, "pause": "5m", "min_requests": 1000},
                {"weight": 100}
            ],
            "analysis": {"max_error_ratio": 1.5, "max_error_abs": 0.05, "max_latency_ratio": 1.25,
                         "latency_slack": "5ms", "min_requests": 100, "alpha": 0.001,
                         "failures": ["5xx", "connect", "timeout", "reset"]}
        }))
        .expect("valid");
        assert_eq!(p.steps.len(), 6);
        assert_eq!(p.min_requests(4), 1000);
        assert_eq!(p.min_requests(1), 100);
        assert_eq!(p, plan(p.to_json()).expect("round trip"));
        let back: Plan =
            serde_json::from_str(&serde_json::to_string(&p).expect("json")).expect("de");
        assert_eq!(back, p);
    }

    #[test]
    fn every_problem_is_named_by_its_path() {
        let e = plan(json!({
            "steps": [
                {"weight": 10},
                {"weight": 5},
                {"mirror": 10, "duration": "1m"},
                {"weight": 12.345},
                {"gate": "Bad Name"},
                {"weight": 50, "gate": "x"},
                {"weight": 60, "colour": 1},
                {"weight": 70, "pause": "0s"}
            ],
            "analysis": {"alpha": 2, "failures": ["5xx", "boom"], "extra": 1}
        }))
        .expect_err("invalid");
        let paths: Vec<&str> = e.iter().map(|e| e.path.as_str()).collect();
        for p in [
            "steps[1].weight",
            "steps[7].pause",
            "steps[2]",
            "steps[3].weight",
            "steps[4].gate",
            "steps[5]",
            "steps[6].colour",
            "steps[6].weight",
            "analysis.alpha",
            "analysis.failures[1]",
            "analysis.extra",
        ] {
            assert!(paths.contains(&p), "{p} not in {paths:?}");
        }
        assert!(plan(json!({"steps": []})).is_err());
        assert!(plan(json!({"steps": [{"gate": "go"}]})).is_err());
        assert!(plan(json!("standard")).is_err());
    }
}
