//! Configuration: the TOML file of SPEC §2, checked into typed values.
//!
//! `parse` walks toml's spanned document tree by hand (rather than through
//! serde) so that it can report *every* problem with its line, not just the
//! first one serde trips on: unknown keys, wrong types, bad durations, bad
//! addresses, duplicate service names, empty pools. A `Config` only exists
//! if the whole file is valid; nothing downstream re-checks it.
//!
//! Relative paths (state file, certificates, token file, CA file) are taken
//! relative to the process's working directory, as the examples in SPEC §2
//! are written (`config/admin.token` from the repository root).

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::ops::{Range, RangeInclusive};
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::HeaderName;
use toml::de::{DeTable, DeValue};
use toml::Spanned;

use crate::color::Color;

pub(crate) mod mirror;
pub(crate) mod rules;

use rules::RuleSpec;

use crate::control_plane::rollout::plan::Plan;

/// A validated configuration. Built only by [`parse`] (or `Config::demo`).
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// `[proxy]`: listeners, timeouts and limits of the data plane.
    pub proxy: ProxyConfig,
    /// `[admin]`: the admin API listener.
    pub admin: AdminConfig,
    /// `[state]`: where routing state is persisted.
    pub(crate) state: StateConfig,
    /// `[[service]]` entries, in file order.
    pub services: Vec<ServiceConfig>,
    /// `[[rollout_plan]]` entries (SPEC §10), each with its `name`.
    pub(crate) rollout_plans: Vec<Plan>,
}

/// `[proxy]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ProxyConfig {
    /// Plain listener (HTTP/1.1 and h2c prior knowledge). Default `0.0.0.0:8080`.
    pub(crate) listen: SocketAddr,
    /// TLS listener (HTTP/1.1 and h2 via ALPN). Default none.
    pub tls_listen: Option<SocketAddr>,
    /// `[[proxy.tls]]` certificates; the first also serves clients without SNI.
    pub tls: Vec<TlsCertConfig>,
    /// Worker threads; 0 = one per core. Default 0.
    pub(crate) workers: usize,
    /// Upstream TCP (and TLS) connect bound. Default 2s.
    pub(crate) connect_timeout: Duration,
    /// Bound on the whole upstream response head. Default 60s.
    pub(crate) request_timeout: Duration,
    /// Longest silence between two reads of an upstream response body
    /// (`Duration::ZERO`: never). Default 60s.
    pub(crate) upstream_read_timeout: Duration,
    /// Most header fields accepted in an upstream response head (502
    /// `head_too_large` above). Default 500.
    pub(crate) max_response_headers: usize,
    /// Downstream keep-alive idle bound. Default 90s.
    pub(crate) idle_timeout: Duration,
    /// Bound on reading one request head (slowloris). Default 10s.
    pub(crate) header_read_timeout: Duration,
    /// Largest request header section accepted (431 above). Default 65536.
    pub(crate) max_request_header_bytes: usize,
    /// Open client connections over all listeners; more are closed at
    /// accept. Default 50000.
    pub(crate) max_connections: usize,
    /// Open client connections per client address (IPv6: per /64); 0 = no
    /// limit. Default 0.
    pub(crate) max_connections_per_client: usize,
    /// Graceful shutdown deadline, and how long upgraded connections may
    /// outlive their pool taking traffic (0 = never closed). Default 30s.
    pub(crate) drain_timeout: Duration,
    /// Add `x-switchyard-pool: blue|green` to responses. Default true.
    pub(crate) add_pool_header: bool,
    /// One access-log line per request (extension to SPEC). Default true.
    pub(crate) access_log: bool,
    /// Make an `x-request-id` when the client sent none, pass it upstream
    /// and echo it in the response (extension to SPEC). Default true.
    pub(crate) request_id: bool,
    /// Add `X-Forwarded-For`, `-Proto` and `-Host` upstream (extension to
    /// SPEC). Default true.
    pub(crate) forwarded_headers: bool,
}

/// One `[[proxy.tls]]` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsCertConfig {
    /// PEM certificate chain.
    pub(crate) cert: PathBuf,
    /// PEM private key (PKCS#8, RSA or EC).
    pub(crate) key: PathBuf,
    /// Line of the entry in the config file, for error messages at reload.
    pub(crate) line: usize,
}

/// `[admin]`.
#[derive(Debug, Clone, PartialEq)]
pub struct AdminConfig {
    /// Default `127.0.0.1:9901`.
    pub listen: SocketAddr,
    /// Bearer tokens, one per line (`NAME:SECRET` or `SECRET`). Required when
    /// `listen` is not a loopback address.
    pub token_file: Option<PathBuf>,
    /// Host names (besides IP literals and `localhost`) the admin listener
    /// answers while no `token_file` is set (SPEC §13, DNS rebinding).
    pub allowed_hosts: Vec<String>,
}

/// `[state]`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StateConfig {
    /// Default `var/switchyard-state.json`. With etcd: the last-known-good
    /// cache a replica starts from while etcd is down.
    pub(crate) path: PathBuf,
    /// `backend = "etcd"` with `[state.etcd]` (SPEC §11); `None` is the
    /// default `"file"`.
    pub(crate) etcd: Option<EtcdConfig>,
}

/// `[state.etcd]` (SPEC §11, fleet mode).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct EtcdConfig {
    /// `http://host:port` of each member; default `["http://127.0.0.1:2379"]`.
    pub(crate) endpoints: Vec<String>,
    /// Key prefix; default `/switchyard`. No trailing `/`.
    pub(crate) prefix: String,
    /// Replicas of one cluster share state; clusters on one etcd and prefix
    /// never see each other's. Default `default`.
    pub(crate) cluster: String,
    /// This replica's name in `/api/v1/replicas`; default `hostname:admin port`.
    pub(crate) replica_id: Option<String>,
    /// Bound on connecting to etcd; default 2 s.
    pub(crate) dial_timeout: Duration,
    /// Bound on one etcd request (a write past it answers 503); default 3 s.
    pub(crate) request_timeout: Duration,
    /// No word from etcd for this long: the replica is stale; default 3 s.
    pub(crate) stale_after: Duration,
    /// TTL of the lease under the replica's presence key; default 10 s.
    pub(crate) lease_ttl: Duration,
}

impl Default for EtcdConfig {
    fn default() -> Self {
        EtcdConfig {
            endpoints: vec!["http://127.0.0.1:2379".to_owned()],
            prefix: "/switchyard".to_owned(),
            cluster: "default".to_owned(),
            replica_id: None,
            dial_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(3),
            stale_after: Duration::from_secs(3),
            lease_ttl: Duration::from_secs(10),
        }
    }
}

/// One `[[service]]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceConfig {
    /// Unique; `[A-Za-z0-9_.-]+` (it appears in admin URLs and metric labels).
    pub name: String,
    /// Host patterns; default `["*"]`.
    pub(crate) hosts: Vec<HostPattern>,
    /// Path prefix; default `/`. Must start with `/`.
    pub path_prefix: String,
    /// Pool live when no state file exists. Default blue.
    pub(crate) initial: Color,
    /// Balance policy within a pool. Default round robin.
    pub(crate) balance: Balance,
    /// CA bundle for `https://` backends (else webpki roots).
    pub(crate) upstream_ca: Option<PathBuf>,
    /// Skip upstream certificate verification (logged loudly). Default false.
    pub(crate) upstream_insecure_skip_verify: bool,
    /// `[service.blue] backends`.
    pub blue: Vec<BackendAddr>,
    /// `[service.green] backends`.
    pub green: Vec<BackendAddr>,
    /// `[service.health]`; `None` = passive ejection only.
    pub(crate) health: Option<HealthConfig>,
    /// `[service.sticky]`; defaults to cookie `switchyard_bucket`, no key.
    pub(crate) sticky: StickyConfig,
    /// `[service.preview]`; defaults to header `x-switchyard-pool`, no token.
    pub(crate) preview: PreviewConfig,
    /// `[[service.rule]]`, in order (SPEC §8).
    pub rules: Vec<RuleSpec>,
    /// Line of `[[service]]` in the file (0 for built-in configs).
    pub(crate) line: usize,
}

impl ServiceConfig {
    /// The configured backends of one pool.
    pub(crate) fn pool(&self, color: Color) -> &[BackendAddr] {
        match color {
            Color::Blue => &self.blue,
            Color::Green => &self.green,
        }
    }
}

/// A host pattern of `hosts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// `*`: any host.
    Any,
    /// `*.example.com`: stored as `.example.com` (lowercase); matches any
    /// host ending with it (not `example.com` itself).
    Suffix(String),
    /// `api.example.com` (lowercase).
    Exact(String),
}

/// Balance policy within a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    /// Next healthy backend in turn.
    RoundRobin,
    /// Power of two choices on in-flight requests.
    LeastRequest,
}

/// Upstream scheme of a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Scheme {
    /// Plain HTTP/1.1.
    Http,
    /// HTTP/1.1 over TLS.
    Https,
}

/// A backend address: `host:port`, `http://host:port` or `https://host:port`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BackendAddr {
    /// `http` unless written `https://`.
    pub(crate) scheme: Scheme,
    /// Host name or IP literal (IPv6 without brackets).
    pub host: String,
    /// Port (required).
    pub port: u16,
}

impl BackendAddr {
    /// Parses `host:port`, `http://host:port`, `https://host:port`, `[::1]:port`.
    /// The error says what is wrong, for config and admin API messages alike.
    pub fn parse(s: &str) -> Result<BackendAddr, String> {
        let (scheme, rest) = if let Some(r) = s.strip_prefix("https://") {
            (Scheme::Https, r)
        } else if let Some(r) = s.strip_prefix("http://") {
            (Scheme::Http, r)
        } else if s.contains("://") {
            return Err(format!(
                "backend `{s}`: unsupported scheme (use host:port, http:// or https://)"
            ));
        } else {
            (Scheme::Http, s)
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.is_empty() {
            return Err(format!("backend `{s}`: empty address, expected host:port"));
        }
        if rest.contains('/') {
            return Err(format!(
                "backend `{s}`: a path is not allowed, expected host:port"
            ));
        }
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let Some((h, p)) = v6.split_once("]:") else {
                return Err(format!("backend `{s}`: expected [ipv6]:port with a port"));
            };
            if h.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(format!("backend `{s}`: `{h}` is not an IPv6 address"));
            }
            (h, p)
        } else {
            let Some((h, p)) = rest.rsplit_once(':') else {
                return Err(format!("backend `{s}`: missing port, expected host:port"));
            };
            if h.contains(':') {
                return Err(format!(
                    "backend `{s}`: write an IPv6 address in brackets, e.g. [::1]:8080"
                ));
            }
            (h, p)
        };
        if host.is_empty() {
            return Err(format!("backend `{s}`: empty host, expected host:port"));
        }
        if !host.contains(':')
            && !host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
        {
            return Err(format!("backend `{s}`: invalid host `{host}`"));
        }
        // `u16::from_str` accepts a leading `+`: only plain digits are a port.
        let digits = !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit());
        let port: u16 = match port.parse() {
            Ok(p) if p > 0 && digits => p,
            _ => return Err(format!("backend `{s}`: invalid port `{port}` (1-65535)")),
        };
        Ok(BackendAddr {
            scheme,
            host: host.to_ascii_lowercase(),
            port,
        })
    }

    /// `host:port` (brackets around IPv6), as used in the `Host` header.
    pub(crate) fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.scheme {
            Scheme::Http => write!(f, "{}", self.authority()),
            Scheme::Https => write!(f, "https://{}", self.authority()),
        }
    }
}

/// `[service.health]`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct HealthConfig {
    /// Path of the GET check; default `/healthz`.
    pub(crate) path: String,
    /// Default 2s.
    pub(crate) interval: Duration,
    /// Default 1s.
    pub(crate) timeout: Duration,
    /// Consecutive failures to mark unhealthy; default 3.
    pub(crate) unhealthy_after: u32,
    /// Consecutive successes to mark healthy; default 2.
    pub(crate) healthy_after: u32,
}

/// `[service.sticky]`.
#[derive(Debug, Clone, PartialEq)]
pub struct StickyConfig {
    /// Cookie holding the bucket; default `switchyard_bucket`.
    pub cookie: String,
    /// Optional user key the bucket is hashed from.
    pub key: Option<StickyKey>,
}

/// Where a sticky key is read from (`header:NAME` or `cookie:NAME`).
#[derive(Debug, Clone, PartialEq)]
pub enum StickyKey {
    /// A request header (name lowercase).
    Header(HeaderName),
    /// A request cookie.
    Cookie(String),
}

/// `[service.preview]`.
#[derive(Debug, Clone, PartialEq)]
pub struct PreviewConfig {
    /// Header naming the pool; default `x-switchyard-pool`.
    pub header: HeaderName,
    /// If set, the header must read `green;token=TOKEN`.
    pub token: Option<String>,
}

/// One problem in a config file: `FILE:line: message` when displayed with
/// [`ConfigErrors`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// 1-based line; 0 when the problem has no place in the file.
    pub line: usize,
    /// What is wrong, naming the key (`proxy.connect_timeout: ...`).
    pub message: String,
}

/// Every problem found in one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors {
    /// The file, as given on the command line.
    pub(crate) file: PathBuf,
    /// In file order.
    pub(crate) errors: Vec<ConfigError>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}:{}: {}", self.file.display(), e.line, e.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// A file the config names (certificate, key, token file, CA bundle) that
/// cannot be used: `FILE:line: cause`, or `FILE: cause` when the problem
/// has no line. `path` is the file whose line is meant: the config file
/// (the line of the entry naming the file) or the named file itself (a
/// token file's line).
#[derive(Debug)]
pub struct FileError {
    /// The file the line is in.
    pub(crate) path: PathBuf,
    /// 1-based line; 0 when none.
    pub(crate) line: usize,
    /// What is wrong.
    pub(crate) source: Box<dyn std::error::Error + Send + Sync>,
}

impl FileError {
    /// A problem at `path:line` (line 0: the file as a whole).
    pub(crate) fn new(
        path: &Path,
        line: usize,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> FileError {
        FileError {
            path: path.to_path_buf(),
            line,
            source: source.into(),
        }
    }
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.path.display(), self.source)
        } else {
            write!(f, "{}:{}: {}", self.path.display(), self.line, self.source)
        }
    }
}

impl std::error::Error for FileError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}

/// Every [`FileError`] of a config, one per line when displayed.
#[derive(Debug)]
pub struct FileErrors(pub(crate) Vec<FileError>);

impl fmt::Display for FileErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for FileErrors {}

/// Reads and parses a config file.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse(&text).map_err(|errors| ConfigErrors {
            file: path.to_path_buf(),
            errors,
        }),
        Err(e) => Err(ConfigErrors {
            file: path.to_path_buf(),
            errors: vec![ConfigError {
                line: 0,
                message: format!("cannot read config file: {e}"),
            }],
        }),
    }
}

// ---------------------------------------------------------------------------
// Defaults: the one place `parse` and `Config::demo` take them from.

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            tls_listen: None,
            tls: Vec::new(),
            workers: 0,
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(60),
            upstream_read_timeout: Duration::from_secs(60),
            max_response_headers: 500,
            idle_timeout: Duration::from_secs(90),
            header_read_timeout: Duration::from_secs(10),
            max_request_header_bytes: 65536,
            max_connections: 50_000,
            max_connections_per_client: 0,
            drain_timeout: Duration::from_secs(30),
            add_pool_header: true,
            request_id: true,
            forwarded_headers: true,
            access_log: true,
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9901)),
            token_file: None,
            allowed_hosts: Vec::new(),
        }
    }
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            path: PathBuf::from("var/switchyard-state.json"),
            etcd: None,
        }
    }
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            path: "/healthz".to_owned(),
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            unhealthy_after: 3,
            healthy_after: 2,
        }
    }
}

impl Default for StickyConfig {
    fn default() -> Self {
        StickyConfig {
            cookie: "switchyard_bucket".to_owned(),
            key: None,
        }
    }
}

impl Default for PreviewConfig {
    fn default() -> Self {
        PreviewConfig {
            header: HeaderName::from_static("x-switchyard-pool"),
            token: None,
        }
    }
}

impl ServiceConfig {
    /// A service with every optional key at its default and empty pools.
    fn with_defaults(name: String, line: usize) -> ServiceConfig {
        ServiceConfig {
            name,
            hosts: vec![HostPattern::Any],
            path_prefix: "/".to_owned(),
            initial: Color::Blue,
            balance: Balance::RoundRobin,
            upstream_ca: None,
            upstream_insecure_skip_verify: false,
            blue: Vec::new(),
            green: Vec::new(),
            health: None,
            sticky: StickyConfig::default(),
            preview: PreviewConfig::default(),
            rules: Vec::new(),
            line,
        }
    }
}

impl Config {
    /// The embedded config of `switchyard demo`: proxy on 127.0.0.1:8080,
    /// admin on 127.0.0.1:9901, one service `demo` for every host and path
    /// whose pools are the two given in-process upstreams.
    pub(crate) fn demo(blue: SocketAddr, green: SocketAddr) -> Config {
        let backend = |a: SocketAddr| BackendAddr {
            scheme: Scheme::Http,
            host: a.ip().to_string(),
            port: a.port(),
        };
        let mut service = ServiceConfig::with_defaults("demo".to_owned(), 0);
        service.blue = vec![backend(blue)];
        service.green = vec![backend(green)];
        service.health = Some(HealthConfig {
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            unhealthy_after: 2,
            healthy_after: 1,
            ..HealthConfig::default()
        });
        Config {
            proxy: ProxyConfig {
                listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
                ..ProxyConfig::default()
            },
            admin: AdminConfig::default(),
            state: StateConfig {
                path: PathBuf::from("var/switchyard-demo-state.json"),
                etcd: None,
            },
            services: vec![service],
            rollout_plans: Vec::new(),
        }
    }
}

// ---------------------------------------------------------------------------
// The parser.

const ROOT_KEYS: &str = "proxy admin state service rollout_plan";
const PROXY_KEYS: &str = "listen tls_listen tls workers connect_timeout request_timeout \
    upstream_read_timeout max_response_headers idle_timeout header_read_timeout \
    max_request_header_bytes max_connections max_connections_per_client drain_timeout \
    add_pool_header access_log request_id forwarded_headers";
const SERVICE_KEYS: &str = "name hosts path_prefix initial balance upstream_ca \
    upstream_insecure_skip_verify blue green health sticky preview rule";
const HEALTH_KEYS: &str = "path interval timeout unhealthy_after healthy_after";

/// Parses config text. On error returns every problem found, sorted by line.
pub fn parse(text: &str) -> Result<Config, Vec<ConfigError>> {
    let cx = Cx {
        text,
        errors: RefCell::new(Vec::new()),
    };
    let config = match DeTable::parse(text) {
        Ok(root) => parse_root(&cx, root.get_ref()),
        Err(e) => {
            let message = format!("TOML syntax error: {}", e.message().trim_end());
            cx.error(&e.span().unwrap_or(0..0), message);
            return Err(cx.errors.into_inner());
        }
    };
    let mut errors = cx.errors.into_inner();
    if errors.is_empty() {
        Ok(config)
    } else {
        errors.sort_by_key(|e| e.line);
        Err(errors)
    }
}

type Value<'i> = Spanned<DeValue<'i>>;

/// The text (for line numbers) and the problems found so far.
struct Cx<'t> {
    text: &'t str,
    errors: RefCell<Vec<ConfigError>>,
}

impl Cx<'_> {
    fn line(&self, span: &Range<usize>) -> usize {
        let newlines = self.text.bytes().take(span.start).filter(|&b| b == b'\n');
        1 + newlines.count()
    }

    fn error(&self, span: &Range<usize>, message: String) {
        let line = self.line(span);
        self.errors.borrow_mut().push(ConfigError { line, message });
    }
}

/// One TOML table being read. Names its keys in messages as `who` + `path`
/// + key, e.g. `service "web": ` + `blue` + `.backends`.
struct Section<'a, 'i, 'c> {
    cx: &'c Cx<'c>,
    table: &'a DeTable<'i>,
    span: Range<usize>,
    who: String,
    path: String,
}

impl<'a, 'i, 'c> Section<'a, 'i, 'c> {
    fn new(cx: &'c Cx<'c>, table: &'a DeTable<'i>, span: Range<usize>, who: String) -> Self {
        let path = String::new();
        Section {
            cx,
            table,
            span,
            who,
            path,
        }
    }

    /// Reports every key not in the whitespace-separated `known` list.
    fn check_keys(&self, label: &str, known: &str) {
        let known: Vec<&str> = known.split_whitespace().collect();
        for (key, _) in self.table.iter() {
            let k: &str = key.get_ref();
            if !known.contains(&k) {
                let hint = suggest(k, &known).map(|s| format!(" (did you mean `{s}`?)"));
                let hint = hint.unwrap_or_default();
                let message = format!("{}unknown key `{k}` in {label}{hint}", self.who);
                self.cx.error(&key.span(), message);
            }
        }
    }

    /// The sub-table `key` (`[service.blue]`), if present and a table.
    fn sub(&self, key: &str, label: &str, known: &str) -> Option<Self> {
        let (table, span) = self.typed(key, "a table", DeValue::as_table)?;
        let mut sub = Section::new(self.cx, table, span, self.who.clone());
        sub.path = self.key(key).split_off(self.who.len());
        sub.check_keys(label, known);
        Some(sub)
    }

    /// The array of tables `key` (`[[service]]`): (index, table, span) each.
    fn tables(&self, key: &str) -> Vec<(usize, &'a DeTable<'i>, Range<usize>)> {
        let expected = format!("an array of tables ([[{}]])", self.key(key));
        let Some((items, _)) = self.typed(key, &expected, DeValue::as_array) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            match item.get_ref().as_table() {
                Some(t) => out.push((i, t, item.span())),
                None => self.wrong_type(&format!("{key}[{i}]"), item, "a table"),
            }
        }
        out
    }

    /// The full name of `key` for messages.
    fn key(&self, key: &str) -> String {
        match self.path.as_str() {
            "" => format!("{}{key}", self.who),
            path => format!("{}{path}.{key}", self.who),
        }
    }

    fn value(&self, key: &str) -> Option<&'a Value<'i>> {
        self.table.get(key)
    }

    fn fail(&self, key: &str, span: &Range<usize>, message: impl fmt::Display) {
        self.cx.error(span, format!("{}: {message}", self.key(key)));
    }

    fn wrong_type(&self, key: &str, v: &Value, expected: &str) {
        let found = v.get_ref().type_str();
        let a = ["a", "an"][usize::from(found.starts_with(['a', 'e', 'i', 'o', 'u']))];
        let message = format!("expected {expected}, found {a} {found}");
        self.fail(key, &v.span(), message);
    }

    /// Reports each of `keys` that is missing, at the table's line.
    fn require(&self, keys: &[&str]) {
        for key in keys.iter().filter(|k| !self.table.contains_key(**k)) {
            let message = format!("{}: missing (required)", self.key(key));
            self.cx.error(&self.span, message);
        }
    }

    /// `key`'s value through `as_type`; a type error if it does not fit.
    fn typed<T>(
        &self,
        key: &str,
        expected: &str,
        as_type: impl FnOnce(&'a DeValue<'i>) -> Option<T>,
    ) -> Option<(T, Range<usize>)> {
        let v = self.value(key)?;
        let found = as_type(v.get_ref());
        if found.is_none() {
            self.wrong_type(key, v, expected);
        }
        found.map(|t| (t, v.span()))
    }

    /// A string checked and converted by `check`, whose error names the key.
    fn get_with<T>(&self, key: &str, check: impl FnOnce(&str) -> Result<T, String>) -> Option<T> {
        let (s, span) = self.typed(key, "a string", DeValue::as_str)?;
        check(s).map_err(|e| self.fail(key, &span, e)).ok()
    }

    fn get_path(&self, key: &str) -> Option<PathBuf> {
        self.get_with(key, |s| match s {
            "" => Err("must not be empty".to_owned()),
            s => Ok(PathBuf::from(s)),
        })
    }

    fn get_bool(&self, key: &str) -> Option<bool> {
        self.typed(key, "a boolean", DeValue::as_bool)
            .map(|(b, _)| b)
    }

    fn get_int_in<T: TryFrom<i64>>(&self, key: &str, range: RangeInclusive<i64>) -> Option<T> {
        let (i, span) = self.typed(key, "an integer", DeValue::as_integer)?;
        match i64::from_str_radix(i.as_str(), i.radix()) {
            Ok(n) if range.contains(&n) => T::try_from(n).ok(),
            _ => {
                let (lo, hi) = (range.start(), range.end());
                self.fail(key, &span, format!("{i} is out of range ({lo}..={hi})"));
                None
            }
        }
    }

    /// A duration string, greater than 0.
    fn get_duration(&self, key: &str) -> Option<Duration> {
        self.duration(key, false)
    }

    /// A duration string where 0 means "never".
    fn get_duration_or_never(&self, key: &str) -> Option<Duration> {
        self.duration(key, true)
    }

    fn duration(&self, key: &str, zero_ok: bool) -> Option<Duration> {
        let (s, span) = self.typed(key, "a duration string like \"2s\"", DeValue::as_str)?;
        let message = match humantime::parse_duration(s) {
            Ok(d) if zero_ok || !d.is_zero() => return Some(d),
            Ok(_) => "must be greater than 0".to_owned(),
            Err(_) => format!("invalid duration {s:?} (expected e.g. \"250ms\", \"2s\", \"5m\")"),
        };
        self.fail(key, &span, message);
        None
    }

    /// A non-empty array of strings, each checked by `check`, no duplicates.
    fn get_list<T: PartialEq>(
        &self,
        key: &str,
        check: impl Fn(&str) -> Result<T, String>,
    ) -> Option<Vec<T>> {
        let (items, span) = self.typed(key, "an array of strings", DeValue::as_array)?;
        if items.is_empty() {
            self.fail(key, &span, "must not be empty");
            return None;
        }
        let mut out: Vec<(T, usize)> = Vec::new();
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            let name = format!("{key}[{i}]");
            let Some(s) = item.get_ref().as_str() else {
                self.wrong_type(&name, item, "a string");
                ok = false;
                continue;
            };
            match check(s).map(|t| (out.iter().find(|(o, _)| *o == t).map(|(_, j)| *j), t)) {
                Ok((None, t)) => out.push((t, i)),
                Ok((Some(first), _)) => {
                    let message = format!("duplicate of {key}[{first}] {s:?}");
                    self.fail(&name, &item.span(), message);
                    ok = false;
                }
                Err(e) => {
                    self.fail(&name, &item.span(), e);
                    ok = false;
                }
            }
        }
        ok.then(|| out.into_iter().map(|(t, _)| t).collect())
    }
}

/// A host name for `[admin] allowed_hosts`: letters, digits, `-` and `.`,
/// no port (the port is not part of the check).
fn parse_allowed_host(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if ok {
        Ok(s.to_ascii_lowercase())
    } else {
        Err(format!(
            "invalid host name {s:?} (a DNS name like \"switchyard.internal\", without port)"
        ))
    }
}

fn set<T>(slot: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *slot = v;
    }
}

fn parse_root(cx: &Cx, table: &DeTable) -> Config {
    let root = Section::new(cx, table, 0..0, String::new());
    root.check_keys("the top level", ROOT_KEYS);
    let proxy = root.sub("proxy", "[proxy]", PROXY_KEYS);
    let proxy = proxy.map_or_else(ProxyConfig::default, |s| parse_proxy(&s));

    let mut admin = AdminConfig::default();
    if let Some(s) = root.sub("admin", "[admin]", "listen token_file allowed_hosts") {
        set(&mut admin.listen, s.get_with("listen", parse_socket_addr));
        admin.token_file = s.get_path("token_file");
        set(
            &mut admin.allowed_hosts,
            s.get_list("allowed_hosts", parse_allowed_host),
        );
        if let Some(v) = s.value("listen") {
            if !admin.listen.ip().is_loopback() && s.value("token_file").is_none() {
                let message = format!(
                    "admin.listen {} is not loopback: set admin.token_file \
                     (else anyone who can reach it can switch traffic)",
                    admin.listen
                );
                cx.error(&v.span(), message);
            }
        }
    }

    let mut state = StateConfig::default();
    if let Some(s) = root.sub("state", "[state]", "path backend etcd") {
        set(&mut state.path, s.get_path("path"));
        state.etcd = parse_state_backend(&s);
    }

    let mut seen = Seen::default();
    let services = root.tables("service").into_iter();
    let services = services.map(|(i, t, span)| parse_service(cx, i, t, span, &mut seen));
    let services: Vec<ServiceConfig> = services.collect();
    match root.value("service") {
        None => cx.errors.borrow_mut().push(ConfigError {
            line: 0,
            message: "no [[service]]: at least one service is required".to_owned(),
        }),
        Some(v) if v.get_ref().as_array().is_some_and(|a| a.is_empty()) => {
            root.fail("service", &v.span(), "at least one service is required");
        }
        Some(_) => {}
    }
    let rollout_plans = parse_rollout_plans(&root);
    Config {
        proxy,
        admin,
        state,
        services,
        rollout_plans,
    }
}

/// `[[rollout_plan]]`: each table goes through the one plan parser (the
/// API's too), and each problem's path is mapped back to its line.
fn parse_rollout_plans(root: &Section) -> Vec<Plan> {
    let mut plans: Vec<(Plan, usize)> = Vec::new();
    for (i, table, span) in root.tables("rollout_plan") {
        let line = root.cx.line(&span);
        let json = table_json(table);
        let name_span = table
            .get("name")
            .map_or_else(|| span.clone(), Spanned::span);
        let who = match table.get("name").and_then(|v| v.get_ref().as_str()) {
            Some(n) => format!("rollout_plan {n:?}"),
            None => format!("rollout_plan[{i}]"),
        };
        if table.get("name").is_none() {
            root.cx
                .error(&span, format!("{who}: name: missing (required)"));
        }
        match Plan::from_json(&json) {
            Ok(plan) => {
                let name = plan.name.clone().unwrap_or_default();
                if let Some((_, first)) = plans.iter().find(|(p, _)| p.name == plan.name) {
                    root.cx.error(
                        &name_span,
                        format!("{who}: duplicate name {name:?} (first defined at line {first})"),
                    );
                }
                plans.push((plan, line));
            }
            Err(errors) => {
                for e in errors {
                    let at = plan_error_span(table, &e.path).unwrap_or_else(|| span.clone());
                    root.cx.error(&at, format!("{who}: {e}"));
                }
            }
        }
    }
    plans.into_iter().map(|(p, _)| p).collect()
}

/// The span of the value at a plan error's path (`steps[2].weight`,
/// `analysis.alpha`), as near as it can be found.
fn plan_error_span(table: &DeTable, path: &str) -> Option<Range<usize>> {
    let mut parts = path.split('.');
    let first = parts.next()?;
    let (key, index) = match first.split_once('[') {
        Some((k, rest)) => (k, rest.trim_end_matches(']').parse::<usize>().ok()),
        None => (first, None),
    };
    let mut v = table.get(key)?;
    if let Some(i) = index {
        v = v.get_ref().as_array()?.get(i)?;
    }
    for part in parts {
        let (key, index) = match part.split_once('[') {
            Some((k, rest)) => (k, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (part, None),
        };
        let Some(next) = v.get_ref().as_table().and_then(|t| t.get(key)) else {
            return Some(v.span());
        };
        v = next;
        if let Some(i) = index {
            match v.get_ref().as_array().and_then(|a| a.get(i)) {
                Some(x) => v = x,
                None => return Some(v.span()),
            }
        }
    }
    Some(v.span())
}

/// A TOML table as JSON (numbers as numbers, datetimes as strings).
fn table_json(table: &DeTable) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    for (k, v) in table.iter() {
        m.insert(k.get_ref().to_string(), value_json(v.get_ref()));
    }
    serde_json::Value::Object(m)
}

fn value_json(v: &DeValue) -> serde_json::Value {
    use serde_json::Value as J;
    match v {
        DeValue::String(s) => J::from(s.to_string()),
        DeValue::Integer(i) => i64::from_str_radix(i.as_str(), i.radix())
            .map_or_else(|_| J::from(i.as_str().to_string()), J::from),
        DeValue::Float(f) => f
            .as_str()
            .replace('_', "")
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map_or_else(|| J::from(f.as_str().to_string()), J::Number),
        DeValue::Boolean(b) => J::from(*b),
        DeValue::Datetime(d) => J::from(d.to_string()),
        DeValue::Array(a) => J::Array(a.iter().map(|x| value_json(x.get_ref())).collect()),
        DeValue::Table(t) => table_json(t),
    }
}

/// `[state] backend` and `[state.etcd]`: the etcd settings when the
/// backend is etcd (`[state.etcd]` without it is an error, not ignored).
fn parse_state_backend(s: &Section) -> Option<EtcdConfig> {
    let backend = s.get_with("backend", |b| match b {
        "file" => Ok(false),
        "etcd" => Ok(true),
        other => Err(format!(
            "unknown backend {other:?} (expected \"file\" or \"etcd\")"
        )),
    });
    let keys =
        "endpoints prefix cluster replica_id dial_timeout request_timeout stale_after lease_ttl";
    let sub = s.sub("etcd", "[state.etcd]", keys);
    if backend != Some(true) {
        if let (Some(sub), Some(false) | None) = (&sub, backend) {
            let message = "[state.etcd] is set but state.backend is not \"etcd\"";
            sub.cx.error(&sub.span, message.to_owned());
        }
        return None;
    }
    let mut e = EtcdConfig::default();
    let Some(sub) = sub else {
        return Some(e);
    };
    set(
        &mut e.endpoints,
        sub.get_list("endpoints", |u| {
            let rest = u.strip_prefix("http://").ok_or_else(|| {
                format!("{u:?}: expected http://host:port (TLS to etcd is not supported yet)")
            })?;
            if rest.is_empty() || rest.contains('/') {
                return Err(format!("{u:?}: expected http://host:port"));
            }
            Ok(u.to_owned())
        }),
    );
    set(
        &mut e.prefix,
        sub.get_with("prefix", |p| {
            if p.starts_with('/') && !p.ends_with('/') && !p.contains("//") {
                Ok(p.to_owned())
            } else {
                Err(format!("{p:?}: must start with `/` and not end with it"))
            }
        }),
    );
    let name = |what: &'static str| {
        move |v: &str| {
            let ok = !v.is_empty()
                && v.len() <= 128
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
            if ok {
                Ok(v.to_owned())
            } else {
                Err(format!("{v:?}: a {what} is 1-128 of A-Z a-z 0-9 - _ . :"))
            }
        }
    };
    set(
        &mut e.cluster,
        sub.get_with("cluster", name("cluster name")),
    );
    e.replica_id = sub.get_with("replica_id", name("replica id"));
    set(&mut e.dial_timeout, sub.get_duration("dial_timeout"));
    set(&mut e.request_timeout, sub.get_duration("request_timeout"));
    set(&mut e.stale_after, sub.get_duration("stale_after"));
    set(&mut e.lease_ttl, sub.get_duration("lease_ttl"));
    if e.lease_ttl < Duration::from_secs(2) {
        let message = "state.etcd.lease_ttl: must be at least 2s".to_owned();
        sub.cx.error(&sub.span, message);
    }
    Some(e)
}

fn parse_proxy(s: &Section) -> ProxyConfig {
    let mut p = ProxyConfig::default();
    set(&mut p.listen, s.get_with("listen", parse_socket_addr));
    p.tls_listen = s.get_with("tls_listen", parse_socket_addr);
    set(&mut p.workers, s.get_int_in("workers", 0..=1024));
    set(&mut p.connect_timeout, s.get_duration("connect_timeout"));
    set(&mut p.request_timeout, s.get_duration("request_timeout"));
    set(
        &mut p.upstream_read_timeout,
        s.get_duration_or_never("upstream_read_timeout"),
    );
    let max = s.get_int_in("max_response_headers", 1..=10_000);
    set(&mut p.max_response_headers, max);
    set(&mut p.idle_timeout, s.get_duration_or_never("idle_timeout"));
    let header_read_timeout = s.get_duration("header_read_timeout");
    set(&mut p.header_read_timeout, header_read_timeout);
    let max = s.get_int_in("max_request_header_bytes", 1024..=1_048_576);
    set(&mut p.max_request_header_bytes, max);
    set(
        &mut p.max_connections,
        s.get_int_in("max_connections", 1..=10_000_000),
    );
    set(
        &mut p.max_connections_per_client,
        s.get_int_in("max_connections_per_client", 0..=10_000_000),
    );
    set(
        &mut p.drain_timeout,
        s.get_duration_or_never("drain_timeout"),
    );
    set(&mut p.add_pool_header, s.get_bool("add_pool_header"));
    set(&mut p.request_id, s.get_bool("request_id"));
    set(&mut p.forwarded_headers, s.get_bool("forwarded_headers"));
    set(&mut p.access_log, s.get_bool("access_log"));

    for (i, table, span) in s.tables("tls") {
        let line = s.cx.line(&span);
        let mut entry = Section::new(s.cx, table, span, String::new());
        entry.path = format!("proxy.tls[{i}]");
        entry.check_keys("[[proxy.tls]]", "cert key");
        entry.require(&["cert", "key"]);
        if let (Some(cert), Some(key)) = (entry.get_path("cert"), entry.get_path("key")) {
            p.tls.push(TlsCertConfig { cert, key, line });
        }
    }
    let certs = s.value("tls").and_then(|t| t.get_ref().as_array());
    match (s.value("tls_listen"), s.value("tls")) {
        (Some(v), _) if certs.is_none_or(|a| a.is_empty()) => {
            let message = "is set but there is no [[proxy.tls]] certificate";
            s.fail("tls_listen", &v.span(), message);
        }
        (None, Some(v)) => {
            let message = "certificates are given but proxy.tls_listen is not set";
            s.fail("tls", &v.span(), message);
        }
        _ => {}
    }
    p
}

/// Names and routes of the services read so far, for cross-service checks.
#[derive(Default)]
struct Seen {
    names: HashMap<String, usize>,
    routes: HashMap<(String, String), (String, usize)>,
}

fn parse_service(
    cx: &Cx,
    index: usize,
    table: &DeTable,
    span: Range<usize>,
    seen: &mut Seen,
) -> ServiceConfig {
    let line = cx.line(&span);
    let who = match table.get("name").and_then(|v| v.get_ref().as_str()) {
        Some(n) if !n.is_empty() => format!("service {n:?}: "),
        _ => format!("service[{index}]: "),
    };
    let s = Section::new(cx, table, span, who);
    s.check_keys("[[service]]", SERVICE_KEYS);
    s.require(&["name"]);
    let name = s.get_with("name", check_service_name);
    let mut svc = ServiceConfig::with_defaults(name.clone().unwrap_or_default(), line);
    let hosts = match s.value("hosts") {
        None => Some(svc.hosts.clone()),
        Some(_) => s.get_list("hosts", parse_host_pattern),
    };
    let prefix = match s.value("path_prefix") {
        None => Some(svc.path_prefix.clone()),
        Some(_) => s.get_with("path_prefix", check_path),
    };
    set(&mut svc.initial, s.get_with("initial", parse_color));
    set(&mut svc.balance, s.get_with("balance", parse_balance));
    svc.upstream_ca = s.get_path("upstream_ca");
    let skip_verify = s.get_bool("upstream_insecure_skip_verify");
    set(&mut svc.upstream_insecure_skip_verify, skip_verify);
    for color in Color::ALL {
        let key = color.as_str();
        if s.value(key).is_none() {
            let message = format!("{}missing [service.{key}] (the {key} pool)", s.who);
            cx.error(&s.span, message);
        } else if let Some(pool) = s.sub(key, &format!("[service.{key}]"), "backends") {
            pool.require(&["backends"]);
            let backends = pool.get_list("backends", BackendAddr::parse);
            let pool = match color {
                Color::Blue => &mut svc.blue,
                Color::Green => &mut svc.green,
            };
            set(pool, backends);
        }
    }
    if let Some(h) = s.sub("health", "[service.health]", HEALTH_KEYS) {
        let mut health = HealthConfig::default();
        set(&mut health.path, h.get_with("path", check_path));
        set(&mut health.interval, h.get_duration("interval"));
        set(&mut health.timeout, h.get_duration("timeout"));
        let (unhealthy, healthy) = ("unhealthy_after", "healthy_after");
        set(
            &mut health.unhealthy_after,
            h.get_int_in(unhealthy, 1..=100),
        );
        set(&mut health.healthy_after, h.get_int_in(healthy, 1..=100));
        svc.health = Some(health);
    }
    if let Some(t) = s.sub("sticky", "[service.sticky]", "cookie key") {
        // `cookie = ""` turns the bucket cookie off: without a sticky key
        // every request draws a fresh bucket and no Set-Cookie is sent.
        let cookie = t.get_with("cookie", |c| {
            if c.is_empty() {
                Ok(String::new())
            } else {
                check_token(c, "cookie name")
            }
        });
        set(&mut svc.sticky.cookie, cookie);
        svc.sticky.key = t.get_with("key", parse_sticky_key);
    }
    if let Some(p) = s.sub("preview", "[service.preview]", "header token") {
        set(
            &mut svc.preview.header,
            p.get_with("header", parse_header_name),
        );
        svc.preview.token = p.get_with("token", check_preview_token);
    }
    svc.rules = parse_rules(&s);

    if let (Some(name), Some(v)) = (name, s.value("name")) {
        if let Some(first) = seen.names.get(&name) {
            let message =
                format!("duplicate service name {name:?} (first defined at line {first})");
            s.fail("name", &v.span(), message);
        } else {
            seen.names.insert(name, line);
        }
    }
    if let (Some(hosts), Some(prefix)) = (hosts, prefix) {
        let at = s
            .value("hosts")
            .map_or_else(|| s.span.clone(), Spanned::span);
        for host in &hosts {
            let route = (host_text(host), prefix.clone());
            if let Some((other, first)) = seen.routes.get(&route) {
                let message = format!(
                    "{}ambiguous route: host `{}` with path_prefix `{prefix}` is also \
                     served by service {other:?} (line {first})",
                    s.who, route.0
                );
                cx.error(&at, message);
            } else {
                seen.routes.insert(route, (svc.name.clone(), line));
            }
        }
        svc.hosts = hosts;
        svc.path_prefix = prefix;
    }
    svc
}

/// `[[service.rule]]`: each rule checked alone (at its own line, every
/// problem), then the names for duplicates. Only a fully valid list is kept.
fn parse_rules(s: &Section) -> Vec<RuleSpec> {
    let mut out = Vec::new();
    let mut ok = true;
    let mut names: Vec<(String, usize)> = Vec::new();
    let tables = s.tables("rule");
    if tables.len() > rules::MAX_RULES {
        if let Some(v) = s.value("rule") {
            s.fail(
                "rule",
                &v.span(),
                format!("more than {} rules", rules::MAX_RULES),
            );
        }
        return out;
    }
    for (i, table, span) in tables {
        let line = s.cx.line(&span);
        let mut r = Section::new(s.cx, table, span, s.who.clone());
        r.path = format!("rule[{i}]");
        r.check_keys("[[service.rule]]", "name match to fallback");
        r.require(&["name", "match", "to"]);
        let name = r.get_with("name", |n| rules::check_name(n).map(|()| n.to_string()));
        let conditions = match r.typed("match", "an array of strings", DeValue::as_array) {
            None => None,
            Some((items, _)) => {
                let mut list = Vec::new();
                for (j, item) in items.iter().enumerate() {
                    match item.get_ref().as_str() {
                        Some(c) => list.push(c.to_string()),
                        None => r.wrong_type(&format!("match[{j}]"), item, "a string"),
                    }
                }
                (list.len() == items.len()).then_some(list)
            }
        };
        let to = r.get_with("to", |c| {
            parse_color(c).map_err(|_| format!("unknown pool {c:?} (blue or green)"))
        });
        let fallback = r.get_bool("fallback").unwrap_or(false);
        let (Some(name), Some(conditions), Some(to)) = (name, conditions, to) else {
            ok = false;
            continue;
        };
        let spec = RuleSpec {
            name,
            conditions,
            to,
            fallback,
        };
        for e in rules::check_rule(i, &spec) {
            // Point at the condition's own line when one is at fault.
            let at = match (
                &e.condition,
                r.value("match").and_then(|v| v.get_ref().as_array()),
            ) {
                (Some(c), Some(items)) => items
                    .iter()
                    .find(|it| {
                        it.get_ref()
                            .as_str()
                            .is_some_and(|x| x.starts_with(c.as_str()))
                    })
                    .map_or_else(|| r.span.clone(), Spanned::span),
                _ => r
                    .value("match")
                    .map_or_else(|| r.span.clone(), Spanned::span),
            };
            s.cx.error(&at, format!("{}{e}", s.who));
            ok = false;
        }
        if let Some((_, first)) = names.iter().find(|(n, _)| *n == spec.name) {
            let at = r
                .value("name")
                .map_or_else(|| r.span.clone(), Spanned::span);
            let message = format!(
                "{}rule {:?}: duplicate name (first defined at line {first})",
                s.who, spec.name
            );
            s.cx.error(&at, message);
            ok = false;
        }
        names.push((spec.name.clone(), line));
        out.push(spec);
    }
    if ok {
        out
    } else {
        Vec::new()
    }
}

fn parse_socket_addr(s: &str) -> Result<SocketAddr, String> {
    let local = s
        .strip_prefix("localhost:")
        .and_then(|p| p.parse::<u16>().ok());
    match local {
        Some(port) => Ok(SocketAddr::from(([127, 0, 0, 1], port))),
        None => s.parse().map_err(|_| {
            format!(
                "invalid address {s:?} (expected e.g. \"127.0.0.1:8080\", \
                 \"[::1]:8080\" or \"localhost:8080\")"
            )
        }),
    }
}

pub(crate) fn check_service_name(s: &str) -> Result<String, String> {
    let bad = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "_.-".contains(*c)));
    match bad {
        _ if s.is_empty() => Err("must not be empty".to_owned()),
        Some(c) => Err(format!(
            "{s:?}: invalid character {c:?} (allowed: A-Z a-z 0-9 _ . -)"
        )),
        None => Ok(s.to_owned()),
    }
}

fn parse_host_pattern(s: &str) -> Result<HostPattern, String> {
    if s == "*" {
        return Ok(HostPattern::Any);
    }
    let host = s.strip_prefix("*.").unwrap_or(s).to_ascii_lowercase();
    let bad_char = host
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "-_.".contains(*c)));
    let why = if host.is_empty() {
        "empty (expected \"*\", \"*.example.com\" or \"example.com\")".to_owned()
    } else if host.contains(':') {
        "a port is not allowed (hosts match any port)".to_owned()
    } else if let Some(c) = bad_char {
        format!("invalid character {c:?}")
    } else if host.split('.').any(str::is_empty) {
        "empty label".to_owned()
    } else if s.starts_with("*.") {
        return Ok(HostPattern::Suffix(format!(".{host}")));
    } else {
        return Ok(HostPattern::Exact(host));
    };
    Err(format!("invalid host pattern {s:?}: {why}"))
}

fn host_text(h: &HostPattern) -> String {
    match h {
        HostPattern::Any => "*".to_owned(),
        HostPattern::Suffix(s) => format!("*{s}"),
        HostPattern::Exact(s) => s.clone(),
    }
}

fn check_path(s: &str) -> Result<String, String> {
    let bad = s
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || "?#".contains(*c));
    match bad {
        _ if !s.starts_with('/') => Err(format!("{s:?} must start with `/`")),
        Some(c) => Err(format!("{s:?}: invalid character {c:?} in a path")),
        None => Ok(s.to_owned()),
    }
}

fn parse_color(s: &str) -> Result<Color, String> {
    s.parse()
        .map_err(|()| format!("expected \"blue\" or \"green\", found {s:?}"))
}

fn parse_balance(s: &str) -> Result<Balance, String> {
    match s {
        "round_robin" => Ok(Balance::RoundRobin),
        "least_request" => Ok(Balance::LeastRequest),
        _ => Err(format!(
            "expected \"round_robin\" or \"least_request\", found {s:?}"
        )),
    }
}

/// An HTTP token (RFC 9110 `tchar`s): header and cookie names.
fn check_token(s: &str, what: &str) -> Result<String, String> {
    let tchar = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if !s.is_empty() && s.chars().all(tchar) {
        Ok(s.to_owned())
    } else {
        Err(format!("{s:?} is not a valid {what}"))
    }
}

fn parse_header_name(s: &str) -> Result<HeaderName, String> {
    let name = check_token(s, "header name")?.to_ascii_lowercase();
    HeaderName::from_bytes(name.as_bytes()).map_err(|_| format!("{s:?} is not a valid header name"))
}

fn parse_sticky_key(s: &str) -> Result<StickyKey, String> {
    match s.split_once(':') {
        Some(("header", name)) => parse_header_name(name).map(StickyKey::Header),
        Some(("cookie", name)) => check_token(name, "cookie name").map(StickyKey::Cookie),
        _ => Err(format!(
            "expected \"header:NAME\" or \"cookie:NAME\", found {s:?}"
        )),
    }
}

fn check_preview_token(s: &str) -> Result<String, String> {
    if s.is_empty() {
        Err("must not be empty (leave the key out for no token)".to_owned())
    } else if s
        .bytes()
        .all(|b| b.is_ascii_graphic() && b != b';' && b != b',')
    {
        Ok(s.to_owned())
    } else {
        Err("only printable ASCII without spaces, `;` or `,` (it is sent in a header)".to_owned())
    }
}

/// The known key closest to `key`, if it is a plausible typo.
fn suggest<'k>(key: &str, known: &[&'k str]) -> Option<&'k str> {
    if key.len() > 64 {
        return None;
    }
    let scored = known.iter().map(|k| (edit_distance(key, k), *k));
    let (d, best) = scored.min()?;
    (d <= 2 && d < key.chars().count()).then_some(best)
}

/// Levenshtein distance.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut row = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let best = (prev[j] + usize::from(ca != *cb)).min(prev[j + 1] + 1);
            row.push(best.min(row[j] + 1));
        }
        prev = row;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A valid service; tests append or substitute around it.
    const WEB: &str = r#"
[[service]]
name = "web"
[service.blue]
backends = ["127.0.0.1:9001"]
[service.green]
backends = ["127.0.0.1:9101"]
"#;

    /// `WEB` with service-level `keys` after its name (line 3 on).
    fn web_with(keys: &str) -> String {
        WEB.replacen("name = \"web\"\n", &format!("name = \"web\"\n{keys}\n"), 1)
    }

    /// Parses `text` without its leading newline, so line 1 is its first line.
    fn parse_text(text: &str) -> Result<Config, Vec<ConfigError>> {
        parse(text.strip_prefix('\n').unwrap_or(text))
    }

    fn errors(text: &str) -> Vec<ConfigError> {
        match parse_text(text) {
            Ok(c) => panic!("expected errors, parsed {c:#?}"),
            Err(e) => e,
        }
    }

    /// The one error of `text` is on `line` and mentions `needle`.
    fn one_error(text: &str, line: usize, needle: &str) {
        let errs = errors(text);
        assert_eq!(errs.len(), 1, "{errs:#?}");
        assert_eq!(errs[0].line, line, "{errs:#?}");
        assert!(errs[0].message.contains(needle), "{errs:#?}");
    }

    #[test]
    fn example_file_parses() {
        let c = match parse(include_str!("../../config/switchyard.toml")) {
            Ok(c) => c,
            Err(e) => panic!("{e:#?}"),
        };
        assert_eq!(c.services.len(), 2);
        let (web, api) = (&c.services[0], &c.services[1]);
        assert_eq!((web.name.as_str(), api.name.as_str()), ("web", "api"));
        assert_eq!(web.blue.len(), 2);
        assert_eq!(api.hosts, [HostPattern::Exact("api.example.com".into())]);
        assert_eq!(api.path_prefix, "/v1");
        assert_eq!(api.balance, Balance::LeastRequest);
        let health = api.health.as_ref().map(|h| (h.timeout, h.unhealthy_after));
        assert_eq!(health, Some((Duration::from_millis(500), 3)));
        assert!(c.proxy.access_log);
    }

    #[test]
    fn minimal_file_gets_the_defaults() {
        let c = match parse_text(WEB) {
            Ok(c) => c,
            Err(e) => panic!("{e:#?}"),
        };
        assert_eq!(c.proxy, ProxyConfig::default());
        assert_eq!(c.proxy.listen, SocketAddr::from(([0, 0, 0, 0], 8080)));
        assert_eq!(c.admin.listen, SocketAddr::from(([127, 0, 0, 1], 9901)));
        assert_eq!(c.state.path, Path::new("var/switchyard-state.json"));
        let web = &c.services[0];
        assert_eq!(
            (web.hosts.as_slice(), web.path_prefix.as_str()),
            (&[HostPattern::Any][..], "/")
        );
        assert_eq!(
            (web.initial, web.balance, web.line),
            (Color::Blue, Balance::RoundRobin, 1)
        );
        assert_eq!(
            web.blue,
            [BackendAddr::parse("127.0.0.1:9001").unwrap_or_else(|e| panic!("{e}"))]
        );
        assert_eq!(web.health, None);
        assert_eq!(web.sticky.cookie, "switchyard_bucket");
        assert_eq!(web.preview.header.as_str(), "x-switchyard-pool");

        let c =
            parse_text(&format!("{WEB}[service.health]\n")).map(|c| c.services[0].health.clone());
        assert_eq!(c, Ok(Some(HealthConfig::default())));
    }

    #[test]
    fn values_are_converted() {
        let text = format!(
            "[proxy]\nlisten = \"localhost:80\"\nidle_timeout = \"0\"\n\
             [admin]\nlisten = \"[::]:9901\"\ntoken_file = \"t\"\n{}\
             [service.sticky]\nkey = \"header:X-User\"\n[service.preview]\nheader = \"X-Pool\"\n",
            web_with("hosts = [\"*.Example.com\", \"API.example.com\"]")
        );
        let c = match parse_text(&text) {
            Ok(c) => c,
            Err(e) => panic!("{e:#?}"),
        };
        assert_eq!(c.proxy.listen, SocketAddr::from(([127, 0, 0, 1], 80)));
        assert_eq!(c.proxy.idle_timeout, Duration::ZERO);
        assert_eq!(
            (c.proxy.max_connections, c.proxy.max_connections_per_client),
            (50_000, 0),
            "defaults (SPEC §14)"
        );
        let limited = parse_text(&format!(
            "[proxy]\nmax_connections = 7\nmax_connections_per_client = 2\n{WEB}"
        ))
        .map(|c| (c.proxy.max_connections, c.proxy.max_connections_per_client));
        assert_eq!(limited, Ok((7, 2)));
        let web = &c.services[0];
        let hosts = [
            HostPattern::Suffix(".example.com".into()),
            HostPattern::Exact("api.example.com".into()),
        ];
        assert_eq!(web.hosts, hosts);
        assert_eq!(
            web.sticky.key,
            Some(StickyKey::Header(HeaderName::from_static("x-user")))
        );
        assert_eq!(web.preview.header.as_str(), "x-pool");
    }

    /// One test per broken file: `name: text => line of its one error, part of the message;`.
    macro_rules! broken {
        ($($name:ident: $text:expr => $line:expr, $needle:expr;)*) => {
            $(#[test] fn $name() { one_error(&$text, $line, $needle) })*
        };
    }

    /// `WEB` with its first backend list replaced by `list`.
    fn blue(list: &str) -> String {
        WEB.replace(r#"["127.0.0.1:9001"]"#, list)
    }

    broken! {
        unknown_key: format!("[proxy]\nlistne = \"127.0.0.1:80\"\n{WEB}")
            => 2, "unknown key `listne` in [proxy] (did you mean `listen`?)";
        unknown_key_in_pool: format!("{WEB}zzz = 1\n")
            => 7, "service \"web\": unknown key `zzz` in [service.green]";
        unknown_section: format!("{WEB}[service.blue.x]\n")
            => 7, "unknown key `x` in [service.blue]";
        bad_duration: format!("[proxy]\nconnect_timeout = \"2 parsecs\"\n{WEB}")
            => 2, "proxy.connect_timeout: invalid duration \"2 parsecs\" (expected e.g. \"250ms\"";
        zero_duration: format!("[proxy]\nrequest_timeout = \"0s\"\n{WEB}")
            => 2, "proxy.request_timeout: must be greater than 0";
        duration_not_a_string: format!("[proxy]\nidle_timeout = 5\n{WEB}")
            => 2, "proxy.idle_timeout: expected a duration string like \"2s\", found an integer";
        duplicate_service_name: format!("{WEB}{}", web_with("path_prefix = \"/a\""))
            => 9, "service \"web\": name: duplicate service name \"web\" (first defined at line 1)";
        empty_pool: WEB.replace(r#"["127.0.0.1:9101"]"#, "[]")
            => 6, "service \"web\": green.backends: must not be empty";
        backend_missing_port: blue(r#"["127.0.0.1"]"#)
            => 4, "service \"web\": blue.backends[0]: backend `127.0.0.1`: missing port";
        backend_bad_port: blue(r#"["127.0.0.1:1", "127.0.0.1:99999"]"#)
            => 4, "blue.backends[1]: backend `127.0.0.1:99999`: invalid port";
        backend_signed_port: blue(r#"["127.0.0.1:+80"]"#) => 4, "invalid port `+80`";
        backend_with_path: blue(r#"["http://127.0.0.1:80/api"]"#) => 4, "a path is not allowed";
        backend_bare_ipv6: blue(r#"["::1:80"]"#) => 4, "write an IPv6 address in brackets";
        duplicate_backend: blue(r#"["127.0.0.1:80", "http://127.0.0.1:80"]"#)
            => 4, "blue.backends[1]: duplicate of backends[0]";
        wrong_type: format!("[proxy]\nworkers = \"4\"\n{WEB}")
            => 2, "proxy.workers: expected an integer, found a string";
        no_connections_at_all: format!("[proxy]\nmax_connections = 0\n{WEB}")
            => 2, "proxy.max_connections: 0 is out of range (1..=10000000)";
        negative_per_client: format!("[proxy]\nmax_connections_per_client = -1\n{WEB}")
            => 2, "proxy.max_connections_per_client: -1 is out of range (0..=10000000)";
        out_of_range: format!("[proxy]\nworkers = 4096\n{WEB}")
            => 2, "proxy.workers: 4096 is out of range (0..=1024)";
        huge_integer: format!("[proxy]\nworkers = 99999999999999999999999\n{WEB}")
            => 2, "out of range";
        pool_not_a_list: WEB.replace(r#"["127.0.0.1:9101"]"#, r#""127.0.0.1:9101""#)
            => 6, "green.backends: expected an array of strings, found a string";
        section_not_a_table: format!("proxy = 1\n{WEB}")
            => 1, "proxy: expected a table, found an integer";
        missing_green_pool: WEB.replace("[service.green]\nbackends = [\"127.0.0.1:9101\"]\n", "")
            => 1, "service \"web\": missing [service.green]";
        toml_syntax_error: "[proxy]\nworkers = 1\nlisten = \"x\n" => 3, "TOML syntax error";
        toml_duplicate_table: format!("{WEB}[service.green]\n")
            => 7, "TOML syntax error: duplicate key";
        admin_not_loopback: format!("[admin]\nlisten = \"0.0.0.0:9901\"\n{WEB}")
            => 2, "admin.listen 0.0.0.0:9901 is not loopback: set admin.token_file";
        ambiguous_routes: format!("{WEB}{}",
            web_with(r#"hosts = ["a.com", "*"]"#).replace("\"web\"", "\"api\""))
            => 10, "service \"api\": ambiguous route: host `*` with path_prefix `/` is also \
                   served by service \"web\" (line 1)";
        tls_listen_without_certificates: format!("[proxy]\ntls_listen = \"[::1]:8443\"\n{WEB}")
            => 2, "proxy.tls_listen: is set but there is no [[proxy.tls]] certificate";
        no_service: "" => 0, "no [[service]]: at least one service is required";
        empty_service_list: "service = []\n" => 1, "at least one service is required";
    }

    #[test]
    fn admin_with_token_file_may_listen_anywhere() {
        let text = format!("[admin]\nlisten = \"0.0.0.0:9901\"\ntoken_file = \"t\"\n{WEB}");
        assert!(parse_text(&text).is_ok());
    }

    #[test]
    fn admin_allowed_hosts() {
        let text = format!("[admin]\nallowed_hosts = [\"Switchyard.Internal\"]\n{WEB}");
        let c = parse_text(&text).expect("valid");
        assert_eq!(
            c.admin.allowed_hosts,
            vec!["switchyard.internal".to_string()]
        );
        let text = format!("[admin]\nallowed_hosts = [\"a.example:9901\"]\n{WEB}");
        let e = format!("{:?}", parse_text(&text).expect_err("port refused"));
        assert!(
            e.contains("allowed_hosts[0]") && e.contains("without port"),
            "{e}"
        );
    }

    #[test]
    fn every_problem_is_reported_with_its_line() {
        let text = r#"[proxy]
listen = "0.0.0.0"
workers = -1

[[service]]
name = "web site"
hosts = ["a.example.com:80", "*"]
initial = "purple"
[service.blue]
backends = ["10.0.0.1:80", 42]
"#;
        let want = [
            (2, "proxy.listen: invalid address \"0.0.0.0\""),
            (3, "proxy.workers: -1 is out of range"),
            (5, "service \"web site\": missing [service.green]"),
            (6, "name: \"web site\": invalid character ' '"),
            (
                7,
                "hosts[0]: invalid host pattern \"a.example.com:80\": a port",
            ),
            (
                8,
                "initial: expected \"blue\" or \"green\", found \"purple\"",
            ),
            (10, "blue.backends[1]: expected a string, found an integer"),
        ];
        let errs = errors(text);
        assert_eq!(errs.len(), want.len(), "{errs:#?}");
        for (e, (line, needle)) in errs.iter().zip(want) {
            assert_eq!(e.line, line, "{errs:#?}");
            assert!(e.message.contains(needle), "{needle}: {errs:#?}");
        }
    }

    #[test]
    fn tls_needs_both_listener_and_certificates() {
        let tls = "[[proxy.tls]]\ncert = \"c.pem\"\n";
        let errs = errors(&format!("{tls}{WEB}"));
        assert_eq!((errs[0].line, errs[1].line), (1, 1), "{errs:#?}");
        assert!(
            errs[0].message.contains("proxy.tls[0].key: missing"),
            "{errs:#?}"
        );
        assert!(
            errs[1].message.contains("proxy.tls_listen is not set"),
            "{errs:#?}"
        );
        let ok = parse_text(&format!(
            "[proxy]\ntls_listen = \"[::1]:8443\"\n{tls}key = \"k.pem\"\n{WEB}"
        ));
        assert_eq!(ok.map(|c| c.proxy.tls[0].line), Ok(3));
    }

    #[test]
    fn demo_config() {
        let (blue, green) = (
            SocketAddr::from(([127, 0, 0, 1], 1)),
            SocketAddr::from(([127, 0, 0, 1], 2)),
        );
        let c = Config::demo(blue, green);
        assert_eq!(c.proxy.listen, SocketAddr::from(([127, 0, 0, 1], 8080)));
        assert_eq!(c.services[0].blue[0].to_string(), "127.0.0.1:1");
        assert_eq!(c.services[0].green[0].to_string(), "127.0.0.1:2");
        assert_eq!(
            c.services[0].health.as_ref().map(|h| h.healthy_after),
            Some(1)
        );
    }

    #[test]
    fn garbage_never_panics() {
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..500 {
            let bytes: Vec<u8> = (0..rng.usize(0..200)).map(|_| rng.u8(..)).collect();
            let _ = parse(&String::from_utf8_lossy(&bytes));
        }
        let deep = format!("x = {}{}", "[".repeat(5000), "]".repeat(5000));
        let _ = parse(&deep);
        let _ = parse(&format!("{}b = 1", "a.".repeat(100_000)));
        let _ = parse(&format!("{}{}", "[a]\nb = 1\n".repeat(1000), WEB));
        one_error(
            &format!("[proxy]\nconnect_timeout = \"99999999999999999999h\"\n{WEB}"),
            2,
            "invalid duration",
        );
        let _ = parse(&format!(
            "{WEB}[service.sticky]\nkey = \"header:\"\ncookie = \"\u{e9}\"\n"
        ));
    }
}
