//! Test harness: real upstream servers, real proxies (in-process or the
//! binary), real clients, all on 127.0.0.1 ephemeral ports.
//!
//! ```ignore
//! let blue = Upstream::start("blue").await;
//! let green = Upstream::start("green").await;
//! let proxy = TestProxy::start(&[Svc::new("web", &[&blue], &[&green])]).await;
//! let (status, body) = proxy.get("/").await;
//! proxy.admin.post("/api/v1/services/web/switch", json!({"to": "green"})).await;
//! ```
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub type Body = BoxBody<Bytes, hyper::Error>;

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

// ===== Temporary directories =====

/// A directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "switchyard-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ===== Upstream servers =====

/// A real HTTP/1.1 server. Paths:
/// - `/` (anything else): answers its name, header `x-upstream: NAME`
/// - `/healthz`: 200, or 503 while `set_healthy(false)`
/// - every other path answers 500 while `set_failing(true)`
/// - `/echo`: streams the request body back
/// - `/count`: reads the body, answers its length in bytes
/// - `/bytes/N`: answers N bytes, streamed in 64 KiB chunks
/// - `/status/N`: answers status N
/// - `/sleep/MS`: answers after MS milliseconds
/// - `/headers`: answers the request head as JSON
/// - `/ws`: WebSocket echo
pub struct Upstream {
    pub addr: SocketAddr,
    pub name: &'static str,
    pub hits: Arc<AtomicUsize>,
    /// Connections open right now.
    pub conns: Arc<AtomicUsize>,
    healthy: Arc<AtomicBool>,
    failing: Arc<AtomicBool>,
    stop: Option<watch::Sender<()>>,
}

impl Upstream {
    pub async fn start(name: &'static str) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Upstream::start_on(listener, name)
    }

    /// Serves on a given listener (to restart on the same port).
    pub fn start_on(listener: TcpListener, name: &'static str) -> Upstream {
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let healthy = Arc::new(AtomicBool::new(true));
        let failing = Arc::new(AtomicBool::new(false));
        let (stop, stop_rx) = watch::channel(());
        let (h, ok, bad) = (
            Arc::clone(&hits),
            Arc::clone(&healthy),
            Arc::clone(&failing),
        );
        let conns = Arc::new(AtomicUsize::new(0));
        let open = Arc::clone(&conns);
        tokio::spawn(async move {
            let mut stop_accept = stop_rx.clone();
            loop {
                let (stream, _) = tokio::select! {
                    a = listener.accept() => match a { Ok(x) => x, Err(_) => continue },
                    _ = stop_accept.changed() => return,
                };
                let (h, ok, bad) = (Arc::clone(&h), Arc::clone(&ok), Arc::clone(&bad));
                let mut stop_conn = stop_rx.clone();
                let open = Arc::clone(&open);
                open.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let (h, ok, bad) = (Arc::clone(&h), Arc::clone(&ok), Arc::clone(&bad));
                        async move { Ok::<_, Infallible>(upstream_answer(name, req, h, ok, bad).await) }
                    });
                    // Takes more header fields than any proxy limit tested.
                    let conn = hyper::server::conn::http1::Builder::new()
                        .max_headers(300)
                        .serve_connection(TokioIo::new(stream), svc)
                        .with_upgrades();
                    tokio::select! {
                        _ = conn => {}
                        // Killed: drop the connection without a goodbye.
                        _ = stop_conn.changed() => {}
                    }
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Upstream {
            addr,
            name,
            hits,
            conns,
            healthy,
            failing,
            stop: Some(stop),
        }
    }

    pub fn open_connections(&self) -> usize {
        self.conns.load(Ordering::SeqCst)
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    pub fn set_healthy(&self, ok: bool) {
        self.healthy.store(ok, Ordering::SeqCst);
    }

    /// While set, every path but `/healthz` answers 500.
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    /// Stops accepting and drops every open connection abruptly.
    pub fn kill(&mut self) {
        self.stop.take();
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn upstream_answer(
    name: &'static str,
    req: Request<Incoming>,
    hits: Arc<AtomicUsize>,
    healthy: Arc<AtomicBool>,
    failing: Arc<AtomicBool>,
) -> Response<Body> {
    let path = req.uri().path().to_string();
    if path == "/healthz" {
        return if healthy.load(Ordering::SeqCst) {
            Response::new(full("ok"))
        } else {
            let mut r = Response::new(full("unhealthy"));
            *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            r
        };
    }
    hits.fetch_add(1, Ordering::SeqCst);
    if failing.load(Ordering::SeqCst) {
        let mut r = Response::new(full(format!("{name} failing")));
        *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        return r;
    }
    let mut resp = match path.as_str() {
        "/echo" => Response::new(req.into_body().boxed()),
        "/count" => {
            let mut body = req.into_body();
            let mut n: u64 = 0;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => n += f.data_ref().map_or(0, |d| d.len() as u64),
                    Err(_) => break,
                }
            }
            Response::new(full(n.to_string()))
        }
        "/headers" => {
            let mut m = serde_json::Map::new();
            for (k, v) in req.headers() {
                m.insert(
                    k.to_string(),
                    Value::from(v.to_str().unwrap_or("").to_string()),
                );
            }
            let v = serde_json::json!({
                "method": req.method().as_str(),
                "uri": req.uri().to_string(),
                "version": format!("{:?}", req.version()),
                "headers": m,
            });
            Response::new(full(v.to_string()))
        }
        "/ws" => return websocket_echo(req).await,
        p if p.starts_with("/bytes/") => {
            let n: usize = p[7..].parse().unwrap_or(0);
            let chunks = (0..n.div_ceil(65536)).map(move |i| {
                let len = (n - i * 65536).min(65536);
                Ok::<_, hyper::Error>(Frame::data(Bytes::from(vec![b'x'; len])))
            });
            Response::new(StreamBody::new(futures_util::stream::iter(chunks)).boxed())
        }
        p if p.starts_with("/status/") => {
            let code: u16 = p[8..].parse().unwrap_or(500);
            let mut r = Response::new(full(format!("{name} {code}")));
            *r.status_mut() =
                StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            r
        }
        p if p.starts_with("/sleep/") => {
            let ms: u64 = p[7..].parse().unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Response::new(full(name))
        }
        _ => Response::new(full(name)),
    };
    resp.headers_mut()
        .insert("x-upstream", http::HeaderValue::from_static(name));
    resp
}

async fn websocket_echo(mut req: Request<Incoming>) -> Response<Body> {
    use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
    use tokio_tungstenite::tungstenite::protocol::Role;
    let key = req
        .headers()
        .get("sec-websocket-key")
        .map(|k| derive_accept_key(k.as_bytes()))
        .unwrap_or_default();
    let on = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = on.await else { return };
        let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            Role::Server,
            None,
        )
        .await;
        use futures_util::{SinkExt, StreamExt};
        let (mut tx, mut rx) = ws.split();
        while let Some(Ok(msg)) = rx.next().await {
            if msg.is_close() {
                break;
            }
            if tx.send(msg).await.is_err() {
                break;
            }
        }
    });
    let mut resp = Response::new(empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert("connection", http::HeaderValue::from_static("upgrade"));
    h.insert("upgrade", http::HeaderValue::from_static("websocket"));
    h.insert(
        "sec-websocket-accept",
        http::HeaderValue::from_str(&key).unwrap(),
    );
    resp
}

// ===== Config =====

/// One `[[service]]` for a test config.
pub struct Svc {
    pub name: String,
    pub hosts: String,
    pub prefix: String,
    pub blue: Vec<SocketAddr>,
    pub green: Vec<SocketAddr>,
    pub extra: String,
}

impl Svc {
    pub fn new(name: &str, blue: &[&Upstream], green: &[&Upstream]) -> Svc {
        Svc {
            name: name.into(),
            hosts: "[\"*\"]".into(),
            prefix: "/".into(),
            blue: blue.iter().map(|u| u.addr).collect(),
            green: green.iter().map(|u| u.addr).collect(),
            extra: String::new(),
        }
    }

    pub fn addrs(name: &str, blue: &[SocketAddr], green: &[SocketAddr]) -> Svc {
        Svc {
            name: name.into(),
            hosts: "[\"*\"]".into(),
            prefix: "/".into(),
            blue: blue.to_vec(),
            green: green.to_vec(),
            extra: String::new(),
        }
    }

    pub fn hosts(mut self, hosts: &str) -> Svc {
        self.hosts = hosts.into();
        self
    }

    pub fn prefix(mut self, prefix: &str) -> Svc {
        self.prefix = prefix.into();
        self
    }

    /// Extra lines inside `[[service]]` (before the pool tables), or whole
    /// sub-tables such as `[service.health]`.
    pub fn extra(mut self, extra: &str) -> Svc {
        self.extra.push_str(extra);
        self.extra.push('\n');
        self
    }

    pub fn toml(&self) -> String {
        let list = |v: &[SocketAddr]| {
            v.iter()
                .map(|a| format!("\"{a}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let (inline, tables): (Vec<&str>, Vec<&str>) = {
            let mut inline = Vec::new();
            let mut tables = Vec::new();
            let mut in_table = false;
            for line in self.extra.lines() {
                if line.trim_start().starts_with('[') {
                    in_table = true;
                }
                if in_table {
                    tables.push(line);
                } else {
                    inline.push(line);
                }
            }
            (inline, tables)
        };
        format!(
            "[[service]]\nname = \"{}\"\nhosts = {}\npath_prefix = \"{}\"\n{}\n[service.blue]\nbackends = [{}]\n[service.green]\nbackends = [{}]\n{}\n",
            self.name,
            self.hosts,
            self.prefix,
            inline.join("\n"),
            list(&self.blue),
            list(&self.green),
            tables.join("\n"),
        )
    }
}

/// `[service.health]` on `/healthz` every `interval`, one check to change
/// state: for tests that wait for backends to be judged.
/// A loopback port free right now, for a child process (etcd,
/// chromedriver) that must be told its port before it binds.
///
/// Drawn below Linux's ephemeral range (32768–60999 by default), which
/// `bind(0)` and outgoing connections take from: a port found free here is
/// not handed to one of the test's own listeners or clients before the
/// child binds it (a port from `bind(0)`, closed and passed on, came back
/// from the next `bind(0)` about once in 14 000). Successive calls in one
/// process never repeat a port.
pub fn free_port() -> u16 {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    const LOW: usize = 20_000;
    const SPAN: usize = 12_000;
    let start = std::process::id() as usize * 7919;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (LOW + (start + n) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {LOW}..{}", LOW + SPAN);
}

/// Checks every `interval`; one failed check ejects. The timeout is long:
/// a killed or failing backend answers at once (refused, 503), and a check
/// slowed by a loaded machine must not eject a healthy one.
pub fn health_every(interval: &str) -> String {
    format!(
        "[service.health]\npath = \"/healthz\"\ninterval = \"{interval}\"\ntimeout = \"2s\"\nunhealthy_after = 1\nhealthy_after = 1"
    )
}

/// A config with listeners on ephemeral loopback ports and state in `dir`.
pub fn config_text(dir: &Path, proxy_extra: &str, services: &[Svc]) -> String {
    let mut s = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n{proxy_extra}\n[admin]\nlisten = \"127.0.0.1:0\"\n[state]\npath = \"{}\"\n\n",
        dir.join("state.json").display()
    );
    for svc in services {
        s.push_str(&svc.toml());
    }
    s
}

// ===== In-process proxy =====

pub struct TestProxy {
    pub running: Option<switchyard::testing::app::Running>,
    pub addr: SocketAddr,
    pub admin: Admin,
    pub dir: TempDir,
    pub config_path: PathBuf,
    pub client: HttpClient,
}

impl TestProxy {
    pub async fn start(services: &[Svc]) -> TestProxy {
        TestProxy::start_with("", services).await
    }

    pub async fn start_with(proxy_extra: &str, services: &[Svc]) -> TestProxy {
        let dir = TempDir::new("proxy");
        let text = config_text(dir.path(), proxy_extra, services);
        TestProxy::start_text(dir, &text).await
    }

    /// Starts with `[admin] token_file` holding `tokens` (token file
    /// text); returns the proxy and the token file's path.
    pub async fn start_with_tokens(tokens: &str, services: &[Svc]) -> (TestProxy, PathBuf) {
        let dir = TempDir::new("tokens");
        let token_file = dir.join("admin.token");
        std::fs::write(&token_file, tokens).unwrap();
        let text = config_text(dir.path(), "", services).replacen(
            "[admin]\nlisten = \"127.0.0.1:0\"\n",
            &format!(
                "[admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"{}\"\n",
                token_file.display()
            ),
            1,
        );
        assert!(text.contains("token_file"));
        (TestProxy::start_text(dir, &text).await, token_file)
    }

    /// Starts from config text (already pointing at `dir` for state).
    pub async fn start_text(dir: TempDir, text: &str) -> TestProxy {
        let config_path = dir.join("switchyard.toml");
        std::fs::write(&config_path, text).unwrap();
        let config = switchyard::testing::config::load(&config_path)
            .unwrap_or_else(|e| panic!("test config invalid:\n{e}\n{text}"));
        let running = switchyard::testing::app::start(
            config,
            switchyard::testing::app::StartOptions {
                config_path: Some(config_path.clone()),
                ..Default::default()
            },
        )
        .await
        .unwrap_or_else(|e| panic!("proxy did not start: {e}"));
        TestProxy {
            addr: running.proxy_addr,
            admin: Admin::new(running.admin_addr),
            running: Some(running),
            dir,
            config_path,
            client: http1_client(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// GET through the proxy: status, headers, body.
    pub async fn get(&self, path: &str) -> (StatusCode, HeaderMap, String) {
        get(&self.client, &self.url(path), &[]).await
    }

    pub async fn get_with(
        &self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (StatusCode, HeaderMap, String) {
        get(&self.client, &self.url(path), headers).await
    }

    pub async fn shutdown(mut self) -> bool {
        match self.running.take() {
            Some(r) => r.shutdown().await,
            None => true,
        }
    }
}

// ===== Clients =====

pub type HttpClient = Client<HttpConnector, Body>;

/// A pooled keep-alive HTTP/1.1 client.
pub fn http1_client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build_http()
}

/// An HTTP/2 prior-knowledge (h2c) client.
pub fn h2_client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

pub async fn get(
    client: &HttpClient,
    url: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, HeaderMap, String) {
    let mut req = Request::get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = client
        .request(req.body(empty()).unwrap())
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e:?}"));
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

/// The admin API.
pub struct Admin {
    pub base: String,
    pub client: HttpClient,
    pub token: Option<String>,
}

impl Admin {
    pub fn new(addr: SocketAddr) -> Admin {
        Admin {
            base: format!("http://{addr}"),
            client: http1_client(),
            token: None,
        }
    }

    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        headers: &[(&str, &str)],
    ) -> (StatusCode, Value) {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{}", self.base, path));
        if let Some(t) = &self.token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let body = match body {
            Some(b) => full(b.to_string()),
            None => empty(),
        };
        let resp = self.client.request(req.body(body).unwrap()).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::from(String::from_utf8_lossy(&bytes).into_owned()));
        (status, value)
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.call("GET", path, None, &[]).await
    }

    pub async fn post(&self, path: &str, body: &str) -> (StatusCode, Value) {
        self.call("POST", path, Some(body), &[]).await
    }

    pub async fn put(&self, path: &str, body: &str) -> (StatusCode, Value) {
        self.call("PUT", path, Some(body), &[]).await
    }

    /// POST and assert 200; returns the service object.
    pub async fn ok(&self, path: &str, body: &str) -> Value {
        let (s, v) = self.post(path, body).await;
        assert_eq!(s, StatusCode::OK, "POST {path} {body}: {v}");
        v
    }

    pub async fn service(&self, name: &str) -> Value {
        let (s, v) = self.get(&format!("/api/v1/services/{name}")).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        v
    }

    pub async fn metrics(&self) -> String {
        let (_, v) = self.get("/metrics").await;
        v.as_str().unwrap_or_default().to_string()
    }
}

/// Reads one sample from Prometheus text (`name{labels} value`).
pub fn metric(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Polls `f` every 20 ms until it returns true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if f().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ===== The binary =====

/// The `switchyard` binary running a config, with its stderr captured.
pub struct ProxyProcess {
    pub child: Child,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl ProxyProcess {
    /// Runs `switchyard run --config FILE ARGS` and waits for its ready line.
    pub fn spawn(config: &Path, args: &[&str]) -> Result<ProxyProcess, String> {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchyard"));
        cmd.arg("run").arg("--config").arg(config).args(args);
        ProxyProcess::spawn_command(cmd)
    }

    /// Like `spawn`, with the open-file limit (`RLIMIT_NOFILE`) lowered
    /// to `nofile` by the shell that then execs the binary (same pid).
    pub fn spawn_with_nofile(config: &Path, nofile: u32) -> Result<ProxyProcess, String> {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!(
                "ulimit -n {nofile} && exec \"$0\" run --config \"$1\""
            ))
            .arg(env!("CARGO_BIN_EXE_switchyard"))
            .arg(config);
        ProxyProcess::spawn_command(cmd)
    }

    fn spawn_command(mut cmd: Command) -> Result<ProxyProcess, String> {
        let mut child = cmd
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let log2 = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                // Log first: whoever wakes on the ready line may read the log.
                let ready = line.contains("switchyard ready");
                log2.lock().unwrap().push(line.clone());
                if ready {
                    let _ = tx.send(Ok(line));
                }
            }
            let _ = tx.send(Err(()));
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(line)) => {
                let field = |k: &str| -> SocketAddr {
                    line.split_whitespace()
                        .find_map(|w| w.strip_prefix(k))
                        .and_then(|v| v.trim_matches('"').parse().ok())
                        .unwrap_or_else(|| panic!("no {k} in {line}"))
                };
                Ok(ProxyProcess {
                    proxy: field("proxy="),
                    admin: field("admin="),
                    child,
                    log,
                })
            }
            _ => {
                let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
                let text = log.lock().unwrap().join("\n");
                Err(format!(
                    "switchyard exited ({status}) before ready:\n{text}"
                ))
            }
        }
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Sends a signal by pid.
    pub fn signal(&self, sig: &str) {
        // bash's builtin kill: no procps needed on a bare machine.
        let status = Command::new("bash")
            .arg("-c")
            .arg(format!("kill -{sig} {}", self.child.id()))
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits up to `timeout` for exit; returns the exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `switchyard ARGS` to completion: exit code, stdout, stderr.
pub fn run_binary(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

// ===== Monitoring assets (config/prometheus) =====

/// Every `switchyard_*` metric name in `text` (a PromQL expression, a
/// rules file, a dashboard). switchyard's names have no `:` (that is for
/// recording rules), so a colon ends a name, as in prose.
pub fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("switchyard_") {
        // Not the tail of a longer identifier.
        let before = rest[..i].chars().next_back();
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            names.insert(tail[..end].to_string());
        }
        rest = &tail[end..];
    }
    names
}

/// Sample names (with `_bucket`, `_sum`, `_count` for histograms) in an
/// exposition: what a query can select.
pub fn sample_names(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

/// Metric family names (`# TYPE` lines): what prose may mention, such as
/// a histogram's base name.
pub fn family_names(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(str::to_string)
        .collect()
}

/// Every PromQL expression of the dashboard (panels and annotations), with
/// where it is.
pub fn dashboard_exprs(v: &Value, at: &str, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("expr", Value::String(e)) => out.push((at.to_string(), e.clone())),
                    _ => dashboard_exprs(x, &format!("{at}.{k}"), out),
                }
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                dashboard_exprs(x, &format!("{at}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// Series that exist only in fleet mode (`[state] backend = "etcd"`).
pub fn is_fleet_only(name: &str) -> bool {
    name.starts_with("switchyard_state_")
}

/// `config/prometheus/grafana-dashboard.json` as JSON.
pub fn grafana_dashboard() -> Value {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/prometheus/grafana-dashboard.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// The dashboard without its "Fleet" row, and the panels of that row
/// (a row's panels follow it, up to the next row).
pub fn split_fleet_row(dashboard: &Value) -> (Value, Vec<Value>) {
    let mut rest = dashboard.clone();
    let mut fleet = Vec::new();
    let mut kept = Vec::new();
    let mut in_fleet = false;
    for p in dashboard["panels"].as_array().unwrap() {
        if p["type"] == "row" {
            in_fleet = p["title"] == "Fleet";
        }
        if in_fleet {
            fleet.push(p.clone());
        } else {
            kept.push(p.clone());
        }
    }
    rest["panels"] = Value::Array(kept);
    (rest, fleet)
}
