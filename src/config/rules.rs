//! Targeting rules (SPEC §8): the written form (`[[service.rule]]` in the
//! config file, `{"rules":[…]}` in the admin API and the state file) and
//! its validation. Both the config parser and the admin API check rules
//! here, so they refuse the same things with the same words; the data plane
//! compiles the checked conditions into its matchers
//! (`data_plane::routing::rules`).

use std::net::IpAddr;

use http::header::HeaderName;
use serde::{Deserialize, Serialize};

use crate::color::Color;

/// Most rules a service may have.
pub(crate) const MAX_RULES: usize = 64;
/// Most conditions a rule may have.
pub(crate) const MAX_CONDITIONS: usize = 16;
/// Longest condition text.
pub(crate) const MAX_CONDITION_BYTES: usize = 1024;

/// One rule as written: `{name, match, to, fallback}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// `[a-z0-9_-]+`, unique in the service.
    pub name: String,
    /// Conditions, every one must hold.
    #[serde(rename = "match")]
    pub conditions: Vec<String>,
    /// The pool the rule sends to.
    pub to: Color,
    /// `to` has no healthy backend: route by the weights (true) or 503.
    #[serde(default)]
    pub fallback: bool,
}

/// One parsed condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Condition {
    /// `header:NAME` or `header:NAME=VALUE` (name lowercased).
    Header(HeaderName, Option<Box<[u8]>>),
    /// `cookie:NAME` or `cookie:NAME=VALUE`.
    Cookie(Box<[u8]>, Option<Box<[u8]>>),
    /// `query:NAME` or `query:NAME=VALUE` (compared as sent, not decoded).
    Query(Box<[u8]>, Option<Box<[u8]>>),
    /// `client:CIDR` (a bare address is a /32 or /128).
    Client(Cidr),
    /// `path_prefix:/p` (segment-aware, like a service's `path_prefix`).
    PathPrefix(Box<str>),
}

/// An address block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Cidr {
    addr: IpAddr,
    bits: u8,
}

impl Cidr {
    /// `10.0.0.0/8`, `2001:db8::/32`, or a bare address.
    pub(crate) fn parse(s: &str) -> Result<Cidr, String> {
        let (a, bits) = match s.split_once('/') {
            Some((a, b)) => (a, Some(b)),
            None => (s, None),
        };
        let addr: IpAddr = a
            .parse()
            .map_err(|_| format!("`{a}` is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let bits = match bits {
            None => max,
            Some(b) => match b.parse::<u8>() {
                Ok(n) if n <= max && !b.starts_with('+') => n,
                _ => return Err(format!("`/{b}` is not a prefix length (0..={max})")),
            },
        };
        let cidr = Cidr { addr, bits };
        if cidr.network() != addr {
            return Err(format!(
                "`{s}` has host bits set (did you mean `{}/{bits}`?)",
                cidr.network()
            ));
        }
        Ok(cidr)
    }

    fn network(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(a) => IpAddr::V4((u32::from(a) & mask32(self.bits)).into()),
            IpAddr::V6(a) => IpAddr::V6((u128::from(a) & mask128(self.bits)).into()),
        }
    }

    /// Is `ip` in the block? An IPv4-mapped IPv6 peer counts as IPv4.
    #[inline]
    pub(crate) fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(n), IpAddr::V4(a)) => u32::from(a) & mask32(self.bits) == u32::from(n),
            (IpAddr::V6(n), IpAddr::V6(a)) => u128::from(a) & mask128(self.bits) == u128::from(n),
            _ => false,
        }
    }
}

fn mask32(bits: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(bits)).unwrap_or(0)
}

fn mask128(bits: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(bits)).unwrap_or(0)
}

/// `NAME` or `NAME=VALUE`.
fn name_value(s: &str) -> (&str, Option<&str>) {
    match s.split_once('=') {
        Some((n, v)) => (n, Some(v)),
        None => (s, None),
    }
}

fn token_ok(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_graphic() && !b"\"(),/:;<=>?@[\\]{}".contains(&b))
}

fn value_ok(v: &str) -> bool {
    v.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
}

impl Condition {
    /// Parses one condition; the error says what is wrong with it.
    pub(crate) fn parse(s: &str) -> Result<Condition, String> {
        if s.len() > MAX_CONDITION_BYTES {
            return Err(format!("longer than {MAX_CONDITION_BYTES} bytes"));
        }
        let Some((form, rest)) = s.split_once(':') else {
            return Err(
                "expected FORM:ARGUMENT with FORM one of header, cookie, query, \
                 client, path_prefix; found no `:`"
                    .to_string(),
            );
        };
        let boxed = |v: Option<&str>| v.map(|v| Box::<[u8]>::from(v.as_bytes()));
        let check_value = |v: Option<&str>| match v {
            Some(v) if !value_ok(v) => Err(format!(
                "value {v:?} has characters other than printable ASCII and space"
            )),
            _ => Ok(()),
        };
        match form {
            "header" => {
                let (n, v) = name_value(rest);
                if !token_ok(n) {
                    return Err(format!("{n:?} is not a valid header name"));
                }
                let name = HeaderName::from_bytes(n.to_ascii_lowercase().as_bytes())
                    .map_err(|_| format!("{n:?} is not a valid header name"))?;
                check_value(v)?;
                Ok(Condition::Header(name, boxed(v)))
            }
            "cookie" | "query" => {
                let (n, v) = name_value(rest);
                if n.is_empty()
                    || !n
                        .bytes()
                        .all(|b| b.is_ascii_graphic() && !b";=&#,".contains(&b))
                {
                    return Err(format!("{n:?} is not a valid {form} name"));
                }
                check_value(v)?;
                if form == "query" {
                    if let Some(v) = v {
                        if v.contains(['&', '#', ' ']) {
                            return Err(format!(
                                "query value {v:?} must not contain `&`, `#` or spaces"
                            ));
                        }
                    }
                }
                let n = Box::<[u8]>::from(n.as_bytes());
                Ok(if form == "cookie" {
                    Condition::Cookie(n, boxed(v))
                } else {
                    Condition::Query(n, boxed(v))
                })
            }
            "client" => Cidr::parse(rest)
                .map(Condition::Client)
                .map_err(|e| format!("bad CIDR: {e}")),
            "path_prefix" => {
                if !rest.starts_with('/') {
                    Err(format!("path prefix {rest:?} must start with `/`"))
                } else if !rest.bytes().all(|b| b.is_ascii_graphic()) || rest.contains(['?', '#']) {
                    Err(format!(
                        "path prefix {rest:?} must be printable ASCII without `?` or `#`"
                    ))
                } else {
                    Ok(Condition::PathPrefix(rest.into()))
                }
            }
            other => Err(format!(
                "unknown form `{other}` (expected header, cookie, query, client or path_prefix)"
            )),
        }
    }
}

/// What is wrong with a rule: the rule (its name, else its index), the
/// condition at fault if one is, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("rule {rule}{}: {message}", condition.as_ref().map(|c| format!(", condition {c:?}")).unwrap_or_default())]
pub(crate) struct RuleError {
    /// Index in the list.
    pub(crate) index: usize,
    /// `"beta"` (quoted name) or `#3` when the name is unusable.
    pub(crate) rule: String,
    /// The condition text at fault.
    pub(crate) condition: Option<String>,
    /// What is wrong.
    pub(crate) message: String,
}

/// Checks a rule name: `[a-z0-9_-]+`, at most 64 bytes.
pub(crate) fn check_name(s: &str) -> Result<(), String> {
    if s.is_empty() {
        Err("name must not be empty".into())
    } else if s.len() > 64 {
        Err("name longer than 64 bytes".into())
    } else if !s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
    {
        Err(format!("name {s:?} must match [a-z0-9_-]+"))
    } else {
        Ok(())
    }
}

/// Checks one rule alone (not its name's uniqueness); every problem.
pub(crate) fn check_rule(index: usize, rule: &RuleSpec) -> Vec<RuleError> {
    let label = if check_name(&rule.name).is_ok() {
        format!("{:?}", rule.name)
    } else {
        format!("#{index}")
    };
    let err = |condition: Option<&str>, message: String| RuleError {
        index,
        rule: label.clone(),
        condition: condition.map(str::to_string),
        message,
    };
    let mut out = Vec::new();
    if let Err(m) = check_name(&rule.name) {
        out.push(err(None, m));
    }
    if rule.conditions.is_empty() {
        out.push(err(
            None,
            "match must not be empty (a rule with no condition would take every request)".into(),
        ));
    }
    if rule.conditions.len() > MAX_CONDITIONS {
        out.push(err(None, format!("more than {MAX_CONDITIONS} conditions")));
    }
    for c in &rule.conditions {
        if let Err(m) = Condition::parse(c) {
            let shown: String = c.chars().take(80).collect();
            out.push(err(Some(&shown), m));
        }
    }
    out
}

/// Checks a whole list: each rule, then unique names and the count.
pub(crate) fn check_rules(rules: &[RuleSpec]) -> Vec<RuleError> {
    let mut out = Vec::new();
    if rules.len() > MAX_RULES {
        out.push(RuleError {
            index: MAX_RULES,
            rule: format!("#{MAX_RULES}"),
            condition: None,
            message: format!("more than {MAX_RULES} rules in one service"),
        });
    }
    for (i, r) in rules.iter().enumerate() {
        out.extend(check_rule(i, r));
        if let Some(first) = rules[..i].iter().position(|o| o.name == r.name) {
            out.push(RuleError {
                index: i,
                rule: format!("{:?}", r.name),
                condition: None,
                message: format!("duplicate name (rule #{first} has it)"),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_parse() {
        assert!(matches!(
            Condition::parse("header:X-Beta=1"),
            Ok(Condition::Header(n, Some(v))) if n.as_str() == "x-beta" && &*v == b"1"
        ));
        assert!(matches!(
            Condition::parse("header:x-beta"),
            Ok(Condition::Header(_, None))
        ));
        assert!(matches!(
            Condition::parse("cookie:plan=pro"),
            Ok(Condition::Cookie(_, Some(_)))
        ));
        assert!(matches!(
            Condition::parse("query:beta"),
            Ok(Condition::Query(_, None))
        ));
        assert!(matches!(
            Condition::parse("path_prefix:/api"),
            Ok(Condition::PathPrefix(_))
        ));
        assert!(Condition::parse("client:10.0.0.0/8").is_ok());
        assert!(Condition::parse("client:2001:db8::/32").is_ok());
        for bad in [
            "host:x",
            "header:",
            "header:bad name",
            "client:10.0.0.1/8",
            "client:10.0.0.0/33",
            "client:nope",
            "path_prefix:api",
            "nocolon",
            "query:a=b&c",
        ] {
            assert!(Condition::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cidr_contains() {
        let c = Cidr::parse("10.1.0.0/16").expect("cidr");
        assert!(c.contains("10.1.2.3".parse().expect("ip")));
        assert!(c.contains("::ffff:10.1.2.3".parse().expect("ip")));
        assert!(!c.contains("10.2.0.1".parse().expect("ip")));
        assert!(Cidr::parse("0.0.0.0/0")
            .expect("cidr")
            .contains("1.2.3.4".parse().expect("ip")));
        let v6 = Cidr::parse("2001:db8::/32").expect("cidr");
        assert!(v6.contains("2001:db8::1".parse().expect("ip")));
        assert!(!v6.contains("10.1.2.3".parse().expect("ip")));
    }

    #[test]
    fn list_errors_name_rule_and_condition() {
        let r = |name: &str, m: &[&str]| RuleSpec {
            name: name.into(),
            conditions: m.iter().map(|s| s.to_string()).collect(),
            to: Color::Green,
            fallback: false,
        };
        let errs = check_rules(&[
            r("beta", &["cookie:plan=pro"]),
            r("beta", &["header:x"]),
            r("office", &["client:10.0.0.300/8"]),
            r("Bad", &[]),
        ]);
        let text: Vec<String> = errs.iter().map(ToString::to_string).collect();
        assert!(text
            .iter()
            .any(|t| t.contains("\"beta\"") && t.contains("duplicate")));
        assert!(text
            .iter()
            .any(|t| t.contains("\"office\"") && t.contains("client:10.0.0.300/8")));
        assert!(text.iter().any(|t| t.contains("#3") && t.contains("empty")));
        assert!(check_rules(&[r("ok", &["query:a=b"])]).is_empty());
    }
}
