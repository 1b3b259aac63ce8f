//! The routing table: one immutable [`Snapshot`] per routing state, swapped
//! atomically by the control plane and loaded once per request.
//!
//! Everything a request needs to be routed is here: which service matches
//! (host, then longest path prefix), which pool (preview header, sticky
//! bucket, weights), which backend (balance policy over available backends,
//! failover to the other pool). The decision functions are pure given the
//! snapshot and the request head, and unit-tested without sockets.

pub(crate) mod rules;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderMap, COOKIE};
use http::HeaderValue;

use crate::color::Color;
use crate::config::{Balance, HostPattern, PreviewConfig, ProxyConfig, StickyConfig, StickyKey};
use crate::data_plane::backend::{now_ms, Backend};
use crate::data_plane::mirror::{Mirror, MirrorStats};
use crate::metrics::PoolMetrics;
use crate::weights::Weights;

pub use rules::{RequestFacts, Rule};

/// Data-plane settings that may change on reload.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Upstream connect bound.
    pub connect_timeout: Duration,
    /// Upstream response head bound, from the end of the request body.
    pub request_timeout: Duration,
    /// Longest silence between two reads of an upstream response body
    /// (`Duration::ZERO`: never).
    pub upstream_read_timeout: Duration,
    /// Most header fields accepted in an upstream response head.
    pub max_response_headers: usize,
    /// Add `x-switchyard-pool` to responses.
    pub add_pool_header: bool,
    /// Write access-log lines.
    pub access_log: bool,
    /// Make, forward and echo `x-request-id`.
    pub request_id: bool,
    /// Add the `X-Forwarded-*` headers upstream.
    pub forwarded_headers: bool,
    /// How long upgraded connections outlive their pool taking traffic.
    pub drain_timeout: Duration,
}

impl Settings {
    /// From `[proxy]`.
    pub(crate) fn from_config(p: &ProxyConfig) -> Settings {
        Settings {
            connect_timeout: p.connect_timeout,
            request_timeout: p.request_timeout,
            upstream_read_timeout: p.upstream_read_timeout,
            max_response_headers: p.max_response_headers,
            add_pool_header: p.add_pool_header,
            access_log: p.access_log,
            request_id: p.request_id,
            forwarded_headers: p.forwarded_headers,
            drain_timeout: p.drain_timeout,
        }
    }
}

/// Retry budget of a service: every request earns a fifth of a retry (up
/// to a reserve of 100), every retry spends one. So retries add at most
/// about 20 % to the load a service sees, even when all its backends fail
/// (Envoy's retry budget, as a token bucket). Starts with 10 retries.
pub(crate) struct RetryBudget {
    /// Tenths of a retry.
    tenths: AtomicUsize,
}

impl RetryBudget {
    const CAP: usize = 1000;
    const EARN: usize = 2;
    const COST: usize = 10;

    /// A budget holding 10 retries.
    pub(crate) fn new() -> RetryBudget {
        RetryBudget {
            tenths: AtomicUsize::new(100),
        }
    }

    /// A request passed: earn. Only a load when the reserve is full.
    #[inline]
    pub(crate) fn earn(&self) {
        if self.tenths.load(Ordering::Relaxed) < Self::CAP {
            self.tenths.fetch_add(Self::EARN, Ordering::Relaxed);
        }
    }

    /// Spends one retry if the budget allows it.
    pub(crate) fn try_spend(&self) -> bool {
        self.tenths
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                t.checked_sub(Self::COST)
            })
            .is_ok()
    }
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self::new()
    }
}

/// The static part of a service: its name, policies and metric handles.
/// Rebuilt only when its config changes.
pub struct Service {
    /// Name (admin URLs, labels, logs).
    pub name: Arc<str>,
    /// Balance policy.
    pub(crate) balance: Balance,
    /// Sticky bucket settings.
    pub(crate) sticky: StickyConfig,
    /// `NAME=` of the sticky cookie, for the Set-Cookie value.
    cookie_prefix: String,
    /// Preview header settings.
    pub(crate) preview: PreviewConfig,
    /// Metric handles per pool (`[blue, green]`).
    pub(crate) metrics: [PoolMetrics; 2],
    /// Bounds retries across all its requests.
    pub(crate) retry_budget: RetryBudget,
    /// Mirroring counters and in-flight cap (SPEC §9); outlive snapshots.
    pub(crate) mirror: Arc<MirrorStats>,
}

impl Service {
    /// A service from its parts.
    pub fn new(
        name: &str,
        balance: Balance,
        sticky: StickyConfig,
        preview: PreviewConfig,
        metrics: [PoolMetrics; 2],
    ) -> Service {
        let cookie_prefix = format!("{}=", sticky.cookie);
        Service {
            name: Arc::from(name),
            balance,
            sticky,
            cookie_prefix,
            preview,
            metrics,
            retry_budget: RetryBudget::new(),
            mirror: Arc::default(),
        }
    }

    /// Metric handles of one pool.
    #[inline]
    pub(crate) fn pool_metrics(&self, color: Color) -> &PoolMetrics {
        &self.metrics[color.index()]
    }

    /// `Set-Cookie` value pinning a client to `bucket`.
    ///
    /// Written on every fresh request during a split, so it is assembled
    /// by hand into one buffer that becomes the header value without a
    /// copy (no `format!`, one allocation).
    pub(crate) fn bucket_cookie(&self, bucket: u16) -> HeaderValue {
        const ATTRS: &[u8] = b"; Path=/; Max-Age=604800; HttpOnly; SameSite=Lax";
        let mut v = bytes::BytesMut::with_capacity(self.cookie_prefix.len() + 4 + ATTRS.len());
        v.extend_from_slice(self.cookie_prefix.as_bytes());
        v.extend_from_slice(crate::data_plane::headers::decimal(
            u64::from(bucket),
            &mut [0; 20],
        ));
        v.extend_from_slice(ATTRS);
        HeaderValue::from_maybe_shared(v.freeze()).unwrap_or_else(|_| HeaderValue::from_static(""))
    }
}

/// The backends of one pool, as one snapshot sees them.
pub struct Pool {
    /// Its backends (may be empty only transiently; config forbids it).
    pub(crate) backends: Box<[Arc<Backend>]>,
    next: AtomicUsize,
}

impl Pool {
    /// A pool of `backends`.
    pub fn new(backends: Vec<Arc<Backend>>) -> Pool {
        Pool {
            backends: backends.into_boxed_slice(),
            next: AtomicUsize::new(0),
        }
    }

    /// Is any backend available now?
    pub fn has_available(&self, now_ms: u64) -> bool {
        self.backends.iter().any(|b| b.is_available(now_ms))
    }

    /// Picks an available backend by `balance`, skipping those in `exclude`
    /// (already tried by this request). `None` if none is available.
    pub(crate) fn pick(
        &self,
        balance: Balance,
        now_ms: u64,
        exclude: &[usize],
    ) -> Option<&Arc<Backend>> {
        let n = self.backends.len();
        if n == 0 {
            return None;
        }
        let usable = |b: &Arc<Backend>| {
            b.is_available(now_ms) && !exclude.contains(&(Arc::as_ptr(b) as usize))
        };
        match balance {
            Balance::RoundRobin => {
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                (0..n)
                    .map(|i| &self.backends[(start + i) % n])
                    .find(|b| usable(b))
            }
            Balance::LeastRequest => {
                if n == 1 {
                    return self.backends.first().filter(|b| usable(b));
                }
                // Power of two choices: two distinct random backends, the
                // less loaded wins; fall back to a scan if neither is usable.
                let i = fastrand::usize(..n);
                let j = (i + 1 + fastrand::usize(..n - 1)) % n;
                let (a, b) = (&self.backends[i], &self.backends[j]);
                match (usable(a), usable(b)) {
                    (true, true) => Some(if b.in_flight() < a.in_flight() { b } else { a }),
                    (true, false) => Some(a),
                    (false, true) => Some(b),
                    (false, false) => {
                        let start = fastrand::usize(..n);
                        (0..n)
                            .map(|k| &self.backends[(start + k) % n])
                            .filter(|b| usable(b))
                            .min_by_key(|b| b.in_flight())
                    }
                }
            }
        }
    }
}

/// One service as routed by one snapshot.
pub struct Route {
    /// Static part.
    pub service: Arc<Service>,
    /// Current weights.
    pub weights: Weights,
    /// Current generation.
    pub generation: u64,
    /// `[blue, green]`.
    pub pools: [Arc<Pool>; 2],
    /// Targeting rules, tried in order (SPEC §8); usually empty.
    pub rules: Box<[Rule]>,
    /// Traffic mirroring (SPEC §9); `None` (off) costs the request path
    /// one branch.
    pub mirror: Option<Box<Mirror>>,
}

impl Route {
    /// One pool.
    #[inline]
    pub fn pool(&self, color: Color) -> &Pool {
        &self.pools[color.index()]
    }
}

/// How the pool of a request was chosen (access log `decision`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Preview header named the pool.
    Preview,
    /// Bucket from a sticky key or cookie.
    Sticky,
    /// Fresh random bucket.
    Weight,
    /// The chosen pool had no available backend; the other served.
    Failover,
    /// A targeting rule named the pool (`PoolChoice::rule` says which).
    Rule,
}

impl Decision {
    /// Log value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Decision::Preview => "preview",
            Decision::Sticky => "sticky",
            Decision::Weight => "weight",
            Decision::Failover => "failover",
            Decision::Rule => "rule",
        }
    }
}

/// The pool a request goes to and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolChoice {
    /// The pool.
    pub color: Color,
    /// Why.
    pub decision: Decision,
    /// The bucket, unless preview decided.
    pub bucket: Option<u16>,
    /// A fresh bucket to pin with a cookie (only during a split).
    pub set_cookie: bool,
    /// The targeting rule that matched (index in `Route::rules`): it decided
    /// when `decision` is `Rule`; otherwise its pool had no available
    /// backend and, with `fallback`, the weights decided.
    pub rule: Option<u16>,
}

/// Chooses the pool for a request (SPEC §3 steps 1 and 2, with the
/// targeting rules of §8 between them).
pub fn choose_pool(route: &Route, req: &RequestFacts<'_>) -> PoolChoice {
    let svc = &*route.service;
    let headers = req.headers;
    if let Some(color) = preview(&svc.preview, headers) {
        return PoolChoice {
            color,
            decision: Decision::Preview,
            bucket: None,
            set_cookie: false,
            rule: None,
        };
    }
    let mut fell_back = None;
    if !route.rules.is_empty() {
        if let Some(i) = rules::first_match(&route.rules, req) {
            let rule = &route.rules[i];
            rule.matches.inc();
            // At most MAX_RULES (64) rules: the index fits.
            let index = u16::try_from(i).ok();
            if !rule.fallback || route.pool(rule.to).has_available(now_ms()) {
                return PoolChoice {
                    color: rule.to,
                    decision: Decision::Rule,
                    bucket: None,
                    set_cookie: false,
                    rule: index,
                };
            }
            fell_back = index;
        }
    }
    let sticky = match &svc.sticky.key {
        Some(StickyKey::Header(name)) => headers.get(name).map(|v| bucket_of_key(v.as_bytes())),
        Some(StickyKey::Cookie(name)) => cookie(headers, name).map(bucket_of_key),
        None => None,
    }
    .or_else(|| {
        // An empty cookie name: the bucket cookie is off.
        if svc.sticky.cookie.is_empty() {
            return None;
        }
        cookie(headers, &svc.sticky.cookie).and_then(parse_bucket)
    });
    let (bucket, decision, fresh) = match sticky {
        Some(b) => (b, Decision::Sticky, false),
        None => (fastrand::u16(..10_000), Decision::Weight, true),
    };
    PoolChoice {
        color: route.weights.pick(bucket),
        decision,
        bucket: Some(bucket),
        set_cookie: fresh
            && route.weights.live() == crate::weights::Live::Split
            && !svc.sticky.cookie.is_empty(),
        rule: fell_back,
    }
}

/// The pool named by an allowed preview header, if any.
fn preview(cfg: &PreviewConfig, headers: &HeaderMap) -> Option<Color> {
    let v = headers.get(&cfg.header)?.to_str().ok()?.trim();
    let (pool, rest) = match v.split_once(';') {
        Some((p, r)) => (p.trim(), Some(r.trim())),
        None => (v, None),
    };
    let color = match pool {
        "blue" => Color::Blue,
        "green" => Color::Green,
        _ => return None,
    };
    match (&cfg.token, rest) {
        (None, _) => Some(color),
        (Some(token), Some(r)) => {
            let given = r.strip_prefix("token=")?;
            constant_time_eq(given.as_bytes(), token.as_bytes()).then_some(color)
        }
        (Some(_), None) => None,
    }
}

/// Compares secrets without an early exit on the first difference.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h [u8]> {
    for v in headers.get_all(COOKIE) {
        for pair in v.as_bytes().split(|&b| b == b';') {
            let pair = pair.trim_ascii();
            if let Some(rest) = pair.strip_prefix(name.as_bytes()) {
                if let Some(value) = rest.strip_prefix(b"=") {
                    return Some(value);
                }
            }
        }
    }
    None
}

/// A bucket cookie value: a decimal 0..=9999.
fn parse_bucket(v: &[u8]) -> Option<u16> {
    if v.is_empty() || v.len() > 4 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = v.iter().fold(0u16, |acc, d| acc * 10 + u16::from(d - b'0'));
    (n < 10_000).then_some(n)
}

/// The bucket of a sticky key: FNV-1a, so every replica agrees.
pub(crate) fn bucket_of_key(key: &[u8]) -> u16 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in key {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // Fold the high bits in: FNV's low bits alone are weakly mixed.
    let h = h ^ (h >> 32);
    (h % 10_000) as u16
}

/// The backend [`pick_backend`] chose.
#[derive(Debug, Clone, Copy)]
pub struct Picked<'r> {
    /// The backend.
    pub backend: &'r Arc<Backend>,
    /// Set when this pick failed over from that pool to the other: the
    /// caller counts it (`switchyard_failovers_total{from}`).
    pub failover_from: Option<Color>,
}

/// Picks a backend in the chosen pool, or fails over to the other pool
/// (SPEC §3 step 3), updating `choice`. A preview request never fails over,
/// nor one sent by a rule (without `fallback` it gets a 503, like a preview).
/// Counts nothing: a failover is reported in [`Picked::failover_from`].
pub fn pick_backend<'r>(
    route: &'r Route,
    choice: &mut PoolChoice,
    exclude: &[usize],
) -> Option<Picked<'r>> {
    let now = now_ms();
    let balance = route.service.balance;
    if let Some(backend) = route.pool(choice.color).pick(balance, now, exclude) {
        return Some(Picked {
            backend,
            failover_from: None,
        });
    }
    if matches!(choice.decision, Decision::Preview | Decision::Rule) {
        return None;
    }
    let from = choice.color;
    let backend = route.pool(from.other()).pick(balance, now, exclude)?;
    let first_failover = choice.decision != Decision::Failover;
    choice.decision = Decision::Failover;
    choice.color = from.other();
    choice.set_cookie = false;
    Some(Picked {
        backend,
        failover_from: first_failover.then_some(from),
    })
}

/// One entry of the match list: a host pattern and path prefix of a route.
struct MatchEntry {
    host: HostPattern,
    prefix: Box<str>,
    route: usize,
}

/// Every route, and the order in which to try them.
pub struct Snapshot {
    /// Routes in config order.
    pub routes: Vec<Route>,
    entries: Vec<MatchEntry>,
    /// Data-plane settings.
    pub(crate) settings: Settings,
}

impl Snapshot {
    /// A snapshot of `routes`, with `hosts` and `prefix` per route.
    pub fn new(routes: Vec<(Route, Vec<HostPattern>, String)>, settings: Settings) -> Snapshot {
        let mut entries = Vec::new();
        let mut rs = Vec::with_capacity(routes.len());
        for (i, (route, hosts, prefix)) in routes.into_iter().enumerate() {
            for h in hosts {
                entries.push(MatchEntry {
                    host: h,
                    prefix: prefix.clone().into_boxed_str(),
                    route: i,
                });
            }
            rs.push(route);
        }
        // Most specific host first (exact, then longer wildcard suffix, then
        // `*`), then longest prefix: the first entry that matches wins.
        entries.sort_by_key(|e| {
            let host_rank = match &e.host {
                HostPattern::Exact(h) => (2, h.len()),
                HostPattern::Suffix(s) => (1, s.len()),
                HostPattern::Any => (0, 0),
            };
            std::cmp::Reverse((host_rank, e.prefix.len()))
        });
        Snapshot {
            routes: rs,
            entries,
            settings,
        }
    }

    /// The route for `host` (port and trailing dot ignored, any case) and
    /// `path`, if any.
    pub fn find(&self, host: &str, path: &str) -> Option<&Route> {
        self.find_index(host, path).map(|i| &self.routes[i])
    }

    /// As [`Snapshot::find`], the index in `routes`.
    pub(crate) fn find_index(&self, host: &str, path: &str) -> Option<usize> {
        let host = strip_port(host);
        let host = host.strip_suffix('.').unwrap_or(host);
        self.entries
            .iter()
            .find(|e| host_matches(&e.host, host) && prefix_matches(&e.prefix, path))
            .map(|e| e.route)
    }

    /// The route of service `name`.
    pub(crate) fn route(&self, name: &str) -> Option<&Route> {
        self.routes.iter().find(|r| &*r.service.name == name)
    }
}

/// `host:port` → `host`; `[v6]:port` → `[v6]`.
fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return match host.find(']') {
            Some(i) => &host[..=i],
            None => host,
        };
    }
    match host.rfind(':') {
        Some(i) => &host[..i],
        None => host,
    }
}

fn host_matches(pattern: &HostPattern, host: &str) -> bool {
    match pattern {
        HostPattern::Any => true,
        HostPattern::Exact(h) => h.eq_ignore_ascii_case(host),
        HostPattern::Suffix(s) => {
            host.len() > s.len()
                && host
                    .get(host.len() - s.len()..)
                    .is_some_and(|tail| tail.eq_ignore_ascii_case(s))
        }
    }
}

/// Segment-aware prefix match: `/api` matches `/api`, `/api/x`, `/api?q`,
/// not `/apix`; a prefix ending in `/` matches anything under it.
pub(crate) fn prefix_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        None => false,
        Some(rest) => {
            prefix.ends_with('/')
                || rest.is_empty()
                || rest.starts_with('/')
                || rest.starts_with('?')
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BackendAddr;
    use crate::metrics::Metrics;

    fn service(name: &str, m: &Metrics) -> Arc<Service> {
        Arc::new(Service::new(
            name,
            Balance::RoundRobin,
            StickyConfig {
                cookie: "switchyard_bucket".into(),
                key: None,
            },
            PreviewConfig {
                header: http::HeaderName::from_static("x-switchyard-pool"),
                token: None,
            },
            [m.pool(name, Color::Blue), m.pool(name, Color::Green)],
        ))
    }

    fn backend(m: &Metrics, port: u16) -> Arc<Backend> {
        let addr = BackendAddr::parse(&format!("127.0.0.1:{port}")).expect("addr");
        let g = m.backend_healthy("t", Color::Blue, &addr.to_string());
        Arc::new(Backend::new(
            addr,
            None,
            crate::data_plane::backend::Health::Healthy,
            false,
            g,
        ))
    }

    fn facts(h: &HeaderMap) -> RequestFacts<'_> {
        let uri = Box::leak(Box::new(http::Uri::from_static("/")));
        RequestFacts::new(h, uri, std::net::IpAddr::from([127, 0, 0, 1]))
    }

    fn route(name: &str, m: &Metrics, green_pct: f64) -> Route {
        Route {
            service: service(name, m),
            weights: Weights::from_green_percent(green_pct).expect("weights"),
            generation: 1,
            pools: [
                Arc::new(Pool::new(vec![backend(m, 1), backend(m, 2)])),
                Arc::new(Pool::new(vec![backend(m, 3)])),
            ],
            rules: Box::new([]),
            mirror: None,
        }
    }

    fn settings() -> Settings {
        Settings {
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(1),
            upstream_read_timeout: Duration::from_secs(60),
            max_response_headers: 500,
            add_pool_header: true,
            request_id: true,
            forwarded_headers: true,
            access_log: false,
            drain_timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn host_then_longest_prefix() {
        let m = Metrics::new();
        let snap = Snapshot::new(
            vec![
                (route("any", &m, 0.0), vec![HostPattern::Any], "/".into()),
                (route("api", &m, 0.0), vec![HostPattern::Any], "/api".into()),
                (
                    route("exact", &m, 0.0),
                    vec![HostPattern::Exact("shop.example.com".into())],
                    "/".into(),
                ),
                (
                    route("wild", &m, 0.0),
                    vec![HostPattern::Suffix(".example.com".into())],
                    "/".into(),
                ),
            ],
            settings(),
        );
        let name = |h: &str, p: &str| snap.find(h, p).map(|r| r.service.name.to_string());
        assert_eq!(name("x.org", "/"), Some("any".into()));
        assert_eq!(name("x.org", "/api/v1"), Some("api".into()));
        assert_eq!(name("x.org", "/api"), Some("api".into()));
        assert_eq!(name("x.org", "/apix"), Some("any".into()));
        assert_eq!(name("SHOP.example.com:8080", "/api"), Some("exact".into()));
        assert_eq!(name("a.example.com", "/"), Some("wild".into()));
        assert_eq!(name("example.com", "/"), Some("any".into()));
        let only_exact = Snapshot::new(
            vec![(
                route("exact", &m, 0.0),
                vec![HostPattern::Exact("a.b".into())],
                "/v1".into(),
            )],
            settings(),
        );
        assert!(only_exact.find("c.d", "/v1").is_none());
        assert!(only_exact.find("a.b", "/v2").is_none());
    }

    #[test]
    fn split_proportions_and_cookie_stickiness() {
        let m = Metrics::new();
        let r = route("web", &m, 25.0);
        let mut green = 0;
        for _ in 0..20_000 {
            let c = choose_pool(&r, &facts(&HeaderMap::new()));
            assert_eq!(c.decision, Decision::Weight);
            assert!(c.set_cookie);
            if c.color == Color::Green {
                green += 1;
            }
        }
        assert!(
            (4_500..5_500).contains(&green),
            "green {green} of 20000 at 25%"
        );
        let mut h = HeaderMap::new();
        h.insert(
            COOKIE,
            HeaderValue::from_static("a=b; switchyard_bucket=2499; c=d"),
        );
        let c = choose_pool(&r, &facts(&h));
        assert_eq!(
            (c.color, c.decision, c.bucket, c.set_cookie),
            (Color::Green, Decision::Sticky, Some(2499), false)
        );
        h.insert(COOKIE, HeaderValue::from_static("switchyard_bucket=2500"));
        assert_eq!(choose_pool(&r, &facts(&h)).color, Color::Blue);
        // Invalid cookie values are ignored.
        for bad in [
            "switchyard_bucket=10000",
            "switchyard_bucket=-1",
            "switchyard_bucket=",
            "switchyard_bucket=12a",
        ] {
            h.insert(COOKIE, HeaderValue::from_static(bad));
            assert_eq!(
                choose_pool(&r, &facts(&h)).decision,
                Decision::Weight,
                "{bad}"
            );
        }
    }

    #[test]
    fn bucket_cookie_value() {
        let m = Metrics::new();
        let r = route("web", &m, 25.0);
        for (bucket, text) in [(0u16, "0"), (7, "7"), (42, "42"), (9999, "9999")] {
            assert_eq!(
                r.service.bucket_cookie(bucket),
                format!("switchyard_bucket={text}; Path=/; Max-Age=604800; HttpOnly; SameSite=Lax")
                    .as_str()
            );
        }
    }

    #[test]
    fn no_cookie_outside_a_split() {
        let m = Metrics::new();
        let r = route("web", &m, 0.0);
        let c = choose_pool(&r, &facts(&HeaderMap::new()));
        assert_eq!(c.color, Color::Blue);
        assert!(!c.set_cookie);
    }

    #[test]
    fn preview_header_and_token() {
        let m = Metrics::new();
        let mut r = route("web", &m, 0.0);
        let mut h = HeaderMap::new();
        h.insert("x-switchyard-pool", HeaderValue::from_static("green"));
        assert_eq!(choose_pool(&r, &facts(&h)).decision, Decision::Preview);
        assert_eq!(choose_pool(&r, &facts(&h)).color, Color::Green);
        h.insert("x-switchyard-pool", HeaderValue::from_static("purple"));
        assert_eq!(choose_pool(&r, &facts(&h)).decision, Decision::Weight);
        let svc = Service::new(
            "web",
            Balance::RoundRobin,
            r.service.sticky.clone(),
            PreviewConfig {
                header: http::HeaderName::from_static("x-switchyard-pool"),
                token: Some("s3cret".into()),
            },
            [m.pool("web", Color::Blue), m.pool("web", Color::Green)],
        );
        r.service = Arc::new(svc);
        h.insert("x-switchyard-pool", HeaderValue::from_static("green"));
        assert_eq!(choose_pool(&r, &facts(&h)).decision, Decision::Weight);
        h.insert(
            "x-switchyard-pool",
            HeaderValue::from_static("green;token=nope"),
        );
        assert_eq!(choose_pool(&r, &facts(&h)).decision, Decision::Weight);
        h.insert(
            "x-switchyard-pool",
            HeaderValue::from_static("green; token=s3cret"),
        );
        assert_eq!(choose_pool(&r, &facts(&h)).color, Color::Green);
    }

    #[test]
    fn sticky_key_is_stable() {
        assert_eq!(bucket_of_key(b"user-42"), bucket_of_key(b"user-42"));
        let spread: std::collections::HashSet<u16> = (0..1000)
            .map(|i| bucket_of_key(format!("user-{i}").as_bytes()) / 1000)
            .collect();
        assert_eq!(spread.len(), 10, "keys spread over every decile");
    }

    #[test]
    fn round_robin_skips_unavailable_and_fails_over() {
        let m = Metrics::new();
        let r = route("web", &m, 0.0);
        let blue = r.pool(Color::Blue);
        let picks: Vec<u16> = (0..4)
            .map(|_| {
                blue.pick(Balance::RoundRobin, now_ms(), &[])
                    .expect("pick")
                    .addr
                    .port
            })
            .collect();
        assert_eq!(picks.iter().filter(|&&p| p == 1).count(), 2);
        blue.backends[0].set_health(crate::data_plane::backend::Health::Unhealthy);
        for _ in 0..4 {
            assert_eq!(
                blue.pick(Balance::RoundRobin, now_ms(), &[])
                    .expect("pick")
                    .addr
                    .port,
                2
            );
        }
        let excluded = [Arc::as_ptr(&blue.backends[1]) as usize];
        assert!(blue
            .pick(Balance::RoundRobin, now_ms(), &excluded)
            .is_none());
        blue.backends[1].set_health(crate::data_plane::backend::Health::Unhealthy);
        let mut choice = PoolChoice {
            color: Color::Blue,
            decision: Decision::Weight,
            bucket: Some(1),
            set_cookie: false,
            rule: None,
        };
        let p = pick_backend(&r, &mut choice, &[]).expect("failover");
        assert_eq!(
            (p.backend.addr.port, choice.color, choice.decision),
            (3, Color::Green, Decision::Failover)
        );
        assert_eq!(p.failover_from, Some(Color::Blue), "the caller counts it");
        let mut preview = PoolChoice {
            color: Color::Blue,
            decision: Decision::Preview,
            bucket: None,
            set_cookie: false,
            rule: None,
        };
        assert!(
            pick_backend(&r, &mut preview, &[]).is_none(),
            "preview never fails over"
        );
    }

    #[test]
    fn retry_budget_bounds_retries() {
        let b = RetryBudget::new();
        let initial = (0..100).filter(|_| b.try_spend()).count();
        assert_eq!(initial, 10);
        for _ in 0..50 {
            b.earn();
        }
        assert_eq!(
            (0..100).filter(|_| b.try_spend()).count(),
            10,
            "50 requests earn 10 retries"
        );
        for _ in 0..100_000 {
            b.earn();
        }
        assert_eq!(
            (0..1000).filter(|_| b.try_spend()).count(),
            100,
            "the reserve is capped"
        );
    }

    #[test]
    fn least_request_prefers_idle() {
        let m = Metrics::new();
        let r = route("web", &m, 0.0);
        let blue = r.pool(Color::Blue);
        let _busy: Vec<_> = (0..5).map(|_| blue.backends[0].start_request()).collect();
        for _ in 0..20 {
            assert_eq!(
                blue.pick(Balance::LeastRequest, now_ms(), &[])
                    .expect("pick")
                    .addr
                    .port,
                2
            );
        }
    }
}
