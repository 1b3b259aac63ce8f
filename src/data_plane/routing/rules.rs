//! Targeting rules compiled for the request path (SPEC §8).
//!
//! A rule's conditions are parsed once, when the snapshot is built: header
//! names are lowercased `HeaderName`s, CIDRs are numbers, values are bytes.
//! Matching a request borrows from it and never allocates. A service with
//! no rules pays one empty-slice check.

use std::cell::Cell;
use std::net::IpAddr;
use std::sync::Arc;

use http::header::{HeaderMap, COOKIE};
use prometheus::IntCounter;

use crate::color::Color;
use crate::config::rules::{Condition, RuleSpec};

/// The request's Cookie header(s), looked up once, when the first cookie
/// condition asks (HTTP/2 clients may split cookies into several fields).
#[derive(Clone, Copy)]
enum Cookies<'a> {
    Unknown,
    Absent,
    One(&'a [u8]),
    Many,
}

/// What a rule may look at in a request.
#[derive(Clone)]
pub struct RequestFacts<'a> {
    /// Request headers.
    pub headers: &'a HeaderMap,
    /// The path (no query).
    pub path: &'a str,
    /// The query string, without `?`.
    pub query: Option<&'a str>,
    /// The TCP peer's address.
    pub client: IpAddr,
    cookies: Cell<Cookies<'a>>,
}

impl<'a> RequestFacts<'a> {
    /// Facts of a request with `headers`, target `uri`, from `client`.
    pub fn new(headers: &'a HeaderMap, uri: &'a http::Uri, client: IpAddr) -> RequestFacts<'a> {
        RequestFacts {
            headers,
            path: uri.path(),
            query: uri.query(),
            client,
            cookies: Cell::new(Cookies::Unknown),
        }
    }

    /// The Cookie header, found on first use and remembered: ten cookie
    /// conditions cost one header-map lookup, not ten.
    fn cookies(&self) -> Cookies<'a> {
        if let Cookies::Unknown = self.cookies.get() {
            let mut all = self.headers.get_all(COOKIE).iter();
            let found = match (all.next(), all.next()) {
                (None, _) => Cookies::Absent,
                (Some(v), None) => Cookies::One(v.as_bytes()),
                (Some(_), Some(_)) => Cookies::Many,
            };
            self.cookies.set(found);
        }
        self.cookies.get()
    }
}

/// One rule, ready to match.
pub struct Rule {
    /// Its name (access log `rule:NAME`).
    pub name: Arc<str>,
    /// Where it sends.
    pub to: Color,
    /// Route by the weights when `to` has no available backend.
    pub fallback: bool,
    conditions: Box<[Test]>,
    /// `switchyard_rule_matches_total{service,rule}`.
    pub(crate) matches: IntCounter,
    /// As written (for the admin API).
    pub(crate) spec: RuleSpec,
}

impl Rule {
    /// Compiles a rule; the error is the first bad condition's.
    pub fn compile(spec: &RuleSpec, matches: IntCounter) -> Result<Rule, String> {
        let mut conditions = spec
            .conditions
            .iter()
            .map(|c| Condition::parse(c).map_err(|e| format!("rule {:?}: {c:?}: {e}", spec.name)))
            .collect::<Result<Vec<_>, _>>()?;
        // All conditions must hold, so their order is free: try the cheap
        // ones first. A rule usually misses, and a CIDR or prefix test
        // decides that in a few nanoseconds where a cookie scan would take
        // tens (measured in benches/routing.rs).
        conditions.sort_by_key(cost_rank);
        let conditions = conditions.into_iter().map(Test::from).collect();
        Ok(Rule {
            name: Arc::from(spec.name.as_str()),
            to: spec.to,
            fallback: spec.fallback,
            conditions,
            matches,
            spec: spec.clone(),
        })
    }

    /// Do all its conditions hold for this request?
    #[inline]
    pub fn matches(&self, req: &RequestFacts<'_>) -> bool {
        self.conditions.iter().all(|c| holds(c, req))
    }
}

/// The index of the first rule whose conditions all hold.
#[inline]
pub(crate) fn first_match(rules: &[Rule], req: &RequestFacts<'_>) -> Option<usize> {
    rules.iter().position(|r| r.matches(req))
}

/// Relative cost of testing a condition: compares of numbers, then of a
/// borrowed path, then one header-map lookup, then scans of the query and
/// of the Cookie header.
fn cost_rank(c: &Condition) -> u8 {
    match c {
        Condition::Client(_) => 0,
        Condition::PathPrefix(_) => 1,
        Condition::Header(..) => 2,
        Condition::Query(..) => 3,
        Condition::Cookie(..) => 4,
    }
}

/// A condition as the request path tests it: a cookie's name comes with a
/// prebuilt SIMD searcher, so that a Cookie header without that name is
/// rejected without splitting it into pairs.
enum Test {
    Cookie(Box<memchr::memmem::Finder<'static>>, Option<Box<[u8]>>),
    Other(Condition),
}

impl From<Condition> for Test {
    fn from(c: Condition) -> Test {
        match c {
            Condition::Cookie(name, value) => Test::Cookie(
                Box::new(memchr::memmem::Finder::new(&*name).into_owned()),
                value,
            ),
            other => Test::Other(other),
        }
    }
}

fn holds(t: &Test, req: &RequestFacts<'_>) -> bool {
    let c = match t {
        Test::Cookie(finder, value) => {
            let name = finder.needle();
            let has = |h: &[u8]| {
                finder.find(h).is_some()
                    && pairs(h, b';').any(|(n, v)| {
                        n == name && value.as_deref().is_none_or(|want| v == Some(want))
                    })
            };
            return match req.cookies() {
                Cookies::Absent | Cookies::Unknown => false,
                Cookies::One(h) => has(h),
                Cookies::Many => req
                    .headers
                    .get_all(COOKIE)
                    .iter()
                    .any(|h| has(h.as_bytes())),
            };
        }
        Test::Other(c) => c,
    };
    match c {
        Condition::Header(name, value) => {
            let mut values = req.headers.get_all(name).iter();
            match value {
                None => values.next().is_some(),
                Some(want) => values.any(|v| v.as_bytes() == &**want),
            }
        }
        // Compiled to `Test::Cookie`.
        Condition::Cookie(..) => false,
        Condition::Query(name, value) => req.query.is_some_and(|q| {
            pairs(q.as_bytes(), b'&').any(|(n, v)| {
                n == &**name && value.as_deref().is_none_or(|want| v.unwrap_or(b"") == want)
            })
        }),
        Condition::Client(cidr) => cidr.contains(req.client),
        Condition::PathPrefix(p) => super::prefix_matches(p, req.path),
    }
}

/// `name=value` pairs separated by `sep` (whitespace around a pair trimmed);
/// a pair without `=` has no value.
fn pairs(s: &[u8], sep: u8) -> impl Iterator<Item = (&[u8], Option<&[u8]>)> {
    s.split(move |&b| b == sep).map(|pair| {
        let pair = pair.trim_ascii();
        match pair.iter().position(|&b| b == b'=') {
            Some(i) => (&pair[..i], Some(&pair[i + 1..])),
            None => (pair, None),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(conds: &[&str]) -> Rule {
        let spec = RuleSpec {
            name: "r".into(),
            conditions: conds.iter().map(|c| c.to_string()).collect(),
            to: Color::Green,
            fallback: false,
        };
        let counter = IntCounter::new("t", "t").expect("counter");
        Rule::compile(&spec, counter).expect("valid rule")
    }

    fn facts<'a>(h: &'a HeaderMap, uri: &'a http::Uri, ip: &str) -> RequestFacts<'a> {
        RequestFacts::new(h, uri, ip.parse().expect("ip"))
    }

    #[test]
    fn cookies_split_over_several_header_fields_are_all_searched() {
        // HTTP/2 clients may send one `cookie` field per cookie.
        let mut h = HeaderMap::new();
        h.append(COOKIE, "a=1".parse().expect("v"));
        h.append(COOKIE, "plan=pro".parse().expect("v"));
        let uri: http::Uri = "/".parse().expect("uri");
        let f = facts(&h, &uri, "10.1.2.3");
        assert!(rule(&["cookie:plan=pro", "cookie:a=1"]).matches(&f));
        assert!(!rule(&["cookie:plan=free"]).matches(&f));
        let none = HeaderMap::new();
        assert!(!rule(&["cookie:plan"]).matches(&facts(&none, &uri, "10.1.2.3")));
    }

    #[test]
    fn each_form_matches_exactly() {
        let mut h = HeaderMap::new();
        h.insert("x-beta", "1".parse().expect("v"));
        h.append(COOKIE, "a=1; plan=pro".parse().expect("v"));
        let uri: http::Uri = "/api/v1/x?beta&tenant=acme".parse().expect("uri");
        let f = facts(&h, &uri, "10.1.2.3");
        for yes in [
            &["header:X-Beta"][..],
            &["header:x-beta=1"],
            &["cookie:plan"],
            &["cookie:plan=pro", "cookie:a=1"],
            &["query:beta"],
            &["query:tenant=acme"],
            &["client:10.0.0.0/8"],
            &["path_prefix:/api"],
            &["path_prefix:/api/"],
        ] {
            assert!(rule(yes).matches(&f), "{yes:?}");
        }
        for no in [
            &["header:x-beta=2"][..],
            &["header:x-other"],
            &["cookie:plan=PRO"],
            &["cookie:pla"],
            &["query:tenant=acm"],
            &["query:beta=1"],
            &["client:192.168.0.0/16"],
            &["path_prefix:/ap"],
            &["header:x-beta=1", "cookie:nope"],
        ] {
            assert!(!rule(no).matches(&f), "{no:?}");
        }
    }
}
