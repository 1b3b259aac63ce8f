//! Traffic mirroring (SPEC §9): the written form of a service's mirror
//! (`PUT /api/v1/services/{name}/mirror`, the state file, and later a
//! rollout plan's mirror step) and its validation. The admin API and
//! [`crate::control_plane::state::apply`] check it here, so both refuse the
//! same things with the same words; the data plane compiles a checked spec
//! into `data_plane::mirror::Mirror`.

use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::ser::Serializer;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::color::Color;

/// Default `methods`: the safe methods (copying writes duplicates them).
pub(crate) const DEFAULT_METHODS: [&str; 2] = ["GET", "HEAD"];
/// Default `max_body_bytes`.
pub(crate) const DEFAULT_MAX_BODY_BYTES: u64 = 64 * 1024;
/// Largest `max_body_bytes` (a copy's body is held in memory until sent).
pub(crate) const MAX_BODY_BYTES_LIMIT: u64 = 16 * 1024 * 1024;
/// Default `max_inflight`.
pub(crate) const DEFAULT_MAX_INFLIGHT: u32 = 64;
/// Largest `max_inflight`.
pub(crate) const MAX_INFLIGHT_LIMIT: u32 = 10_000;
/// Default `timeout`.
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest `timeout`.
pub(crate) const MAX_TIMEOUT: Duration = Duration::from_secs(300);
/// Most entries in `methods`.
const MAX_METHODS: usize = 32;

/// A service's mirror, as written:
/// `{"to","percent","methods","max_body_bytes","max_inflight","timeout"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MirrorSpec {
    /// The pool copies go to. Only requests the routing sends to the other
    /// pool are copied.
    pub to: Color,
    /// Share of eligible requests copied, in basis points (1..=10000;
    /// written as a percent with up to two decimals).
    #[serde(rename = "percent", with = "percent_bp")]
    pub percent_bp: u16,
    /// Methods copied (default GET, HEAD: the defaults SPEC §9 shows).
    #[serde(default = "default_methods")]
    pub methods: Vec<String>,
    /// Largest request body copied; a larger one drops the copy.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: u64,
    /// Most copies in flight at once for the service; more are dropped.
    #[serde(default = "default_max_inflight")]
    pub max_inflight: u32,
    /// Bound on one copy's whole exchange.
    #[serde(default = "default_timeout", with = "duration_str")]
    pub timeout: Duration,
}

fn default_methods() -> Vec<String> {
    DEFAULT_METHODS.iter().map(|m| (*m).to_string()).collect()
}
fn default_max_body() -> u64 {
    DEFAULT_MAX_BODY_BYTES
}
fn default_max_inflight() -> u32 {
    DEFAULT_MAX_INFLIGHT
}
fn default_timeout() -> Duration {
    DEFAULT_TIMEOUT
}

/// A mirror field that is invalid: its name and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct MirrorError {
    /// The JSON field at fault.
    pub field: &'static str,
    /// What is wrong with it.
    pub message: String,
}

fn bad(field: &'static str, message: impl Into<String>) -> MirrorError {
    MirrorError {
        field,
        message: message.into(),
    }
}

impl MirrorSpec {
    /// A spec with the defaults for everything but `to` and `percent_bp`.
    pub fn new(to: Color, percent_bp: u16) -> MirrorSpec {
        MirrorSpec {
            to,
            percent_bp,
            methods: default_methods(),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_inflight: DEFAULT_MAX_INFLIGHT,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// The percent, as written (`percent_bp / 100`).
    pub fn percent(&self) -> f64 {
        f64::from(self.percent_bp) / 100.0
    }

    /// Checks every field (whoever built the spec); the first problem
    /// names its field.
    pub fn check(&self) -> Result<(), MirrorError> {
        if self.percent_bp == 0 || self.percent_bp > 10_000 {
            return Err(bad(
                "percent",
                "must be more than 0 and at most 100 (DELETE stops mirroring)",
            ));
        }
        if self.methods.is_empty() {
            return Err(bad("methods", "must not be empty"));
        }
        if self.methods.len() > MAX_METHODS {
            return Err(bad("methods", format!("more than {MAX_METHODS} methods")));
        }
        for (i, m) in self.methods.iter().enumerate() {
            let valid = !m.is_empty()
                && m.len() <= 32
                && m.bytes().all(|b| b.is_ascii_uppercase() || b == b'-');
            if !valid {
                return Err(bad(
                    "methods",
                    format!("[{i}]: `{m}` is not an HTTP method in upper case (GET, POST, ...)"),
                ));
            }
            if m == "CONNECT" {
                return Err(bad(
                    "methods",
                    format!("[{i}]: CONNECT opens a tunnel and is never copied"),
                ));
            }
            if self.methods[..i].contains(m) {
                return Err(bad("methods", format!("[{i}]: `{m}` is listed twice")));
            }
        }
        if self.max_body_bytes > MAX_BODY_BYTES_LIMIT {
            return Err(bad(
                "max_body_bytes",
                format!("must be at most {MAX_BODY_BYTES_LIMIT} (16 MiB)"),
            ));
        }
        if self.max_inflight == 0 || self.max_inflight > MAX_INFLIGHT_LIMIT {
            return Err(bad(
                "max_inflight",
                format!("must be from 1 to {MAX_INFLIGHT_LIMIT}"),
            ));
        }
        if self.timeout.is_zero() || self.timeout > MAX_TIMEOUT {
            return Err(bad("timeout", "must be more than 0 and at most 5m"));
        }
        Ok(())
    }

    /// Decodes and checks the admin API's body (`reason` is left to the
    /// caller); unknown fields are refused, each problem names its field.
    pub(crate) fn from_json(body: &Map<String, Value>) -> Result<MirrorSpec, MirrorError> {
        const KNOWN: [&str; 7] = [
            "to",
            "percent",
            "methods",
            "max_body_bytes",
            "max_inflight",
            "timeout",
            "reason",
        ];
        if let Some(k) = body.keys().find(|k| !KNOWN.contains(&k.as_str())) {
            // `field` must be static: the unknown name goes in the message.
            return Err(bad(
                "mirror",
                format!("unknown field `{k}` (expected: {})", KNOWN.join(", ")),
            ));
        }
        let to = match body.get("to") {
            None | Some(Value::Null) => return Err(bad("to", "missing (\"blue\" or \"green\")")),
            Some(Value::String(s)) => s
                .parse::<Color>()
                .map_err(|()| bad("to", format!("expected \"blue\" or \"green\", got \"{s}\"")))?,
            Some(v) => {
                return Err(bad(
                    "to",
                    format!("expected \"blue\" or \"green\", got {v}"),
                ))
            }
        };
        let percent_bp = match body.get("percent") {
            None | Some(Value::Null) => {
                return Err(bad(
                    "percent",
                    "missing (share of requests copied, 0.01 to 100)",
                ))
            }
            Some(Value::Number(n)) => {
                percent_to_bp(n.as_f64().unwrap_or(f64::NAN)).map_err(|m| bad("percent", m))?
            }
            Some(v) => return Err(bad("percent", format!("expected a number, got {v}"))),
        };
        let mut spec = MirrorSpec::new(to, percent_bp);
        match body.get("methods") {
            None | Some(Value::Null) => {}
            Some(Value::Array(list)) => {
                if list.len() > MAX_METHODS {
                    return Err(bad("methods", format!("more than {MAX_METHODS} methods")));
                }
                spec.methods = list
                    .iter()
                    .enumerate()
                    .map(|(i, v)| match v {
                        Value::String(s) => Ok(s.clone()),
                        v => Err(bad("methods", format!("[{i}]: expected a string, got {v}"))),
                    })
                    .collect::<Result<_, _>>()?;
            }
            Some(v) => {
                return Err(bad(
                    "methods",
                    format!("expected a list like [\"GET\", \"HEAD\"], got {v}"),
                ))
            }
        }
        let int = |field: &'static str| -> Result<Option<u64>, MirrorError> {
            match body.get(field) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Number(n)) => n
                    .as_u64()
                    .map(Some)
                    .ok_or_else(|| bad(field, format!("expected a whole number ≥ 0, got {n}"))),
                Some(v) => Err(bad(field, format!("expected a whole number, got {v}"))),
            }
        };
        if let Some(n) = int("max_body_bytes")? {
            spec.max_body_bytes = n;
        }
        if let Some(n) = int("max_inflight")? {
            spec.max_inflight = u32::try_from(n).unwrap_or(u32::MAX);
        }
        match body.get("timeout") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) => {
                spec.timeout = humantime::parse_duration(s).map_err(|e| {
                    bad(
                        "timeout",
                        format!("`{s}` is not a duration like \"5s\": {e}"),
                    )
                })?;
            }
            Some(v) => {
                return Err(bad(
                    "timeout",
                    format!("expected a duration like \"5s\", got {v}"),
                ))
            }
        }
        spec.check()?;
        Ok(spec)
    }
}

/// A percent with at most two decimals, more than 0 and at most 100, in
/// basis points.
fn percent_to_bp(p: f64) -> Result<u16, String> {
    if !p.is_finite() || p <= 0.0 || p > 100.0 {
        return Err(format!(
            "must be more than 0 and at most 100 (DELETE stops mirroring), got {p}"
        ));
    }
    let bp = (p * 100.0).round();
    if (bp - p * 100.0).abs() > 1e-6 {
        return Err(format!("at most two decimals, got {p}"));
    }
    // 1..=10000: fits.
    Ok(bp as u16)
}

/// `percent_bp` written as a percent number.
mod percent_bp {
    use super::*;

    pub(super) fn serialize<S: Serializer>(bp: &u16, s: S) -> Result<S::Ok, S::Error> {
        if bp % 100 == 0 {
            s.serialize_u64(u64::from(*bp / 100))
        } else {
            s.serialize_f64(f64::from(*bp) / 100.0)
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
        let p = f64::deserialize(d)?;
        percent_to_bp(p).map_err(de::Error::custom)
    }
}

/// A duration written like `"5s"`.
mod duration_str {
    use super::*;

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(s: &str) -> Map<String, Value> {
        match serde_json::from_str(s) {
            Ok(Value::Object(m)) => m,
            _ => Map::new(),
        }
    }

    #[test]
    fn defaults_and_round_trip() {
        let spec = MirrorSpec::from_json(&obj(r#"{"to":"green","percent":12.5}"#)).expect("ok");
        assert_eq!(spec, {
            let mut s = MirrorSpec::new(Color::Green, 1250);
            s.methods = vec!["GET".into(), "HEAD".into()];
            s
        });
        let json = serde_json::to_value(&spec).expect("json");
        assert_eq!(json["percent"], 12.5);
        assert_eq!(json["timeout"], "5s");
        let back: MirrorSpec = serde_json::from_value(json).expect("back");
        assert_eq!(back, spec);
        let full: MirrorSpec = serde_json::from_str(r#"{"to":"blue","percent":100}"#).expect("d");
        assert_eq!((full.percent_bp, full.max_inflight), (10_000, 64));
        assert_eq!(serde_json::to_value(&full).expect("json")["percent"], 100);
    }

    #[test]
    fn every_problem_names_its_field() {
        for (body, field) in [
            (r#"{"percent":10}"#, "to"),
            (r#"{"to":"red","percent":10}"#, "to"),
            (r#"{"to":"green"}"#, "percent"),
            (r#"{"to":"green","percent":0}"#, "percent"),
            (r#"{"to":"green","percent":101}"#, "percent"),
            (r#"{"to":"green","percent":1.005}"#, "percent"),
            (r#"{"to":"green","percent":"10"}"#, "percent"),
            (r#"{"to":"green","percent":10,"methods":[]}"#, "methods"),
            (
                r#"{"to":"green","percent":10,"methods":["get"]}"#,
                "methods",
            ),
            (
                r#"{"to":"green","percent":10,"methods":["CONNECT"]}"#,
                "methods",
            ),
            (
                r#"{"to":"green","percent":10,"methods":["GET","GET"]}"#,
                "methods",
            ),
            (r#"{"to":"green","percent":10,"methods":"GET"}"#, "methods"),
            (
                r#"{"to":"green","percent":10,"max_body_bytes":-1}"#,
                "max_body_bytes",
            ),
            (
                r#"{"to":"green","percent":10,"max_body_bytes":99999999999}"#,
                "max_body_bytes",
            ),
            (
                r#"{"to":"green","percent":10,"max_inflight":0}"#,
                "max_inflight",
            ),
            (r#"{"to":"green","percent":10,"timeout":"soon"}"#, "timeout"),
            (r#"{"to":"green","percent":10,"timeout":"0s"}"#, "timeout"),
            (r#"{"to":"green","percent":10,"timeout":5}"#, "timeout"),
            (r#"{"to":"green","percent":10,"colour":1}"#, "mirror"),
        ] {
            let e = MirrorSpec::from_json(&obj(body)).expect_err(body);
            assert_eq!(e.field, field, "{body}: {e}");
        }
        let ok = MirrorSpec::from_json(&obj(
            r#"{"to":"green","percent":0.01,"methods":["POST","GET"],"max_body_bytes":0,"max_inflight":3,"timeout":"250ms","reason":"x"}"#,
        ))
        .expect("valid");
        assert_eq!(ok.percent_bp, 1);
        assert_eq!(ok.timeout, Duration::from_millis(250));
    }
}
