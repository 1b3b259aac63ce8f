//! Edge hardening (SPEC §14, issue 15; issue 17 item 7): h2c never reaches
//! an upstream; `max_connections` and `max_connections_per_client` close
//! connections over a limit at once and count them, on plain and TLS
//! listeners, changed by reload; upgraded (WebSocket) connections count as
//! connections; out of file descriptors the accept loop backs off, logs
//! once per interval and recovers; many clients that stop reading leave the
//! proxy serving others.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use http::{Request, StatusCode};
use http_body_util::BodyExt;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

// ===== Helpers =====

/// A TCP connection to `to` from the loopback address `from`.
async fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(from.parse::<IpAddr>().unwrap(), 0))
        .unwrap();
    socket.connect(to).await.unwrap()
}

/// One keep-alive HTTP/1.1 client connection.
struct Conn {
    send: SendRequest<Body>,
}

impl Conn {
    async fn open(from: &str, to: SocketAddr) -> Conn {
        let stream = connect_from(from, to).await;
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        Conn { send }
    }

    /// GET `path` on this connection: status (None if the connection failed).
    async fn get(&mut self, path: &str) -> Option<StatusCode> {
        self.send.ready().await.ok()?;
        let req = Request::get(path)
            .header("host", "a")
            .body(empty())
            .unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(10), self.send.send_request(req))
            .await
            .ok()?
            .ok()?;
        let status = resp.status();
        resp.into_body().collect().await.ok()?;
        Some(status)
    }
}

/// Sends a request on `s` and reads until the proxy closes: true if it
/// closed without answering a byte (refused at accept).
async fn closed_unanswered(mut s: TcpStream) -> bool {
    // The proxy may already have closed: a failed write is fine.
    let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await;
    let mut buf = Vec::new();
    // Bounded only so a regression fails instead of hanging: a connection
    // that is not refused is held open much longer (header_read_timeout).
    match tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await {
        Ok(Ok(_)) => buf.is_empty(),
        Ok(Err(_)) => buf.is_empty(), // reset: closed with unread bytes
        Err(_) => false,
    }
}

async fn refused_total(p: &TestProxy, reason: &str) -> f64 {
    let m = p.admin.metrics().await;
    metric(
        &m,
        &format!("switchyard_connections_refused_total{{reason=\"{reason}\"}}"),
    )
    .unwrap_or_else(|| panic!("no refused series for {reason}:\n{m}"))
}

async fn open_gauge(p: &TestProxy, listener: &str) -> f64 {
    let m = p.admin.metrics().await;
    metric(
        &m,
        &format!("switchyard_open_connections{{listener=\"{listener}\"}}"),
    )
    .unwrap_or(0.0)
}

/// Rewrites the proxy's config file (`from` → `to`) and reloads it.
async fn reload_with(p: &TestProxy, from: &str, to: &str) {
    let text = std::fs::read_to_string(&p.config_path).unwrap();
    assert!(text.contains(from), "{text}");
    std::fs::write(&p.config_path, text.replacen(from, to, 1)).unwrap();
    let (s, body) = p.admin.post("/api/v1/reload", "").await;
    assert_eq!(s, StatusCode::OK, "{body}");
}

// ===== h2c =====

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_upgrade_never_reaches_an_upstream_in_any_spelling() {
    let up = Upstream::start("up").await;
    let p = TestProxy::start(&[Svc::new("web", &[&up], &[&up])]).await;
    let cases = [
        "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n",
        "connection: upgrade\r\nupgrade: H2C\r\nhttp2-settings: AAMAAABkAAQAAP__\r\n",
        "Connection: HTTP2-Settings, keep-alive, Upgrade\r\nUpgrade: h2c, foo/1\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n",
        "Connection: Upgrade\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n",
        "Connection: keep-alive\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n",
        "Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n",
        // No upgrade asked: a plain request, kept alive unless it says not.
        "HTTP2-Settings: AAMAAABkAAQAAP__\r\nConnection: close\r\n",
        "Connection: Upgrade\r\nUpgrade: HTTP/2.0\r\n",
        "Connection: Upgrade\r\nUpgrade: h2\r\n",
        "Connection: Upgrade\r\nUpgrade: h2c\r\nUpgrade: h2c\r\n",
    ];
    for extra in cases {
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        let head = format!("GET /headers HTTP/1.1\r\nHost: a\r\n{extra}\r\n");
        s.write_all(head.as_bytes()).await.unwrap();
        // Served, then closed (nothing more is read from a connection that
        // asked to leave HTTP/1.1): read to the end.
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("connection kept open after {extra:?}"))
            .unwrap();
        let text = String::from_utf8_lossy(&buf);
        assert!(text.starts_with("HTTP/1.1 200 "), "{extra:?}:\n{text}");
        let body = text.split("\r\n\r\n").nth(1).unwrap();
        let seen: Value = serde_json::from_str(body).unwrap();
        let headers = seen["headers"].as_object().unwrap();
        assert!(
            !headers.contains_key("http2-settings"),
            "HTTP2-Settings reached the upstream for {extra:?}: {seen}"
        );
        // Another protocol listed beside h2c may be passed on, alone.
        match headers.get("upgrade").and_then(Value::as_str) {
            None => assert!(!headers.contains_key("connection"), "{seen}"),
            Some(u) => assert!(
                !u.to_ascii_lowercase().contains("h2") && extra.contains("foo/1"),
                "Upgrade: {u} reached the upstream for {extra:?}: {seen}"
            ),
        }
        assert_eq!(seen["version"], "HTTP/1.1");
    }
    // A WebSocket listed beside h2c still upgrades, to WebSocket.
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\n\
          Upgrade: h2c, websocket\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 101 "), "{text}");
    assert!(text.contains("upgrade: websocket"), "{text}");
}

// ===== Connection limits =====

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_past_its_limit_is_closed_while_others_are_served() {
    let up = Upstream::start("up").await;
    let p = TestProxy::start_with(
        "max_connections_per_client = 3",
        &[Svc::new("web", &[&up], &[&up])],
    )
    .await;
    let mut mine = Vec::new();
    for _ in 0..3 {
        let mut c = Conn::open("127.0.0.1", p.addr).await;
        assert_eq!(c.get("/").await, Some(StatusCode::OK));
        mine.push(c);
    }
    // The fourth from the same address is closed at once.
    assert!(closed_unanswered(connect_from("127.0.0.1", p.addr).await).await);
    assert_eq!(refused_total(&p, "max_connections_per_client").await, 1.0);
    // Another client is served normally.
    let mut others = Vec::new();
    for _ in 0..3 {
        let mut c = Conn::open("127.0.0.2", p.addr).await;
        assert_eq!(c.get("/").await, Some(StatusCode::OK));
        others.push(c);
    }
    // The established ones keep working.
    for c in &mut mine {
        assert_eq!(c.get("/").await, Some(StatusCode::OK));
    }
    assert_eq!(refused_total(&p, "max_connections_per_client").await, 1.0);
    assert_eq!(refused_total(&p, "max_connections").await, 0.0);
    assert_eq!(open_gauge(&p, "http").await, 6.0);

    // A closed connection frees its place.
    drop(mine.pop());
    assert!(
        eventually(Duration::from_secs(10), || async {
            open_gauge(&p, "http").await == 5.0
        })
        .await
    );
    let mut again = Conn::open("127.0.0.1", p.addr).await;
    assert_eq!(again.get("/").await, Some(StatusCode::OK));
    mine.push(again);

    // Lowered on reload: nothing established is closed, nothing new admitted.
    reload_with(
        &p,
        "max_connections_per_client = 3",
        "max_connections_per_client = 1",
    )
    .await;
    assert!(closed_unanswered(connect_from("127.0.0.2", p.addr).await).await);
    assert!(closed_unanswered(connect_from("127.0.0.1", p.addr).await).await);
    for c in mine.iter_mut().chain(others.iter_mut()) {
        assert_eq!(c.get("/").await, Some(StatusCode::OK));
    }
    let mut third = Conn::open("127.0.0.3", p.addr).await;
    assert_eq!(third.get("/").await, Some(StatusCode::OK));
    assert_eq!(refused_total(&p, "max_connections_per_client").await, 3.0);
}

/// A self-signed certificate and key for `localhost`, written into `dir`.
fn self_signed(dir: &TempDir) -> (std::path::PathBuf, std::path::PathBuf) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    (cert, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_connections_new_ones_are_closed_on_plain_and_tls_listeners() {
    let up = Upstream::start("up").await;
    let dir = TempDir::new("maxconn");
    let (cert, key) = self_signed(&dir);
    let proxy_extra = format!(
        "max_connections = 3\nheader_read_timeout = \"60s\"\ntls_listen = \"127.0.0.1:0\"\n\
         [[proxy.tls]]\ncert = \"{}\"\nkey = \"{}\"\n",
        cert.display(),
        key.display()
    );
    let text = config_text(dir.path(), &proxy_extra, &[Svc::new("web", &[&up], &[&up])]);
    let p = TestProxy::start_text(dir, &text).await;
    let tls_addr = p.running.as_ref().unwrap().tls_addr.unwrap();

    // Two plain connections and one on the TLS listener (a TCP connection
    // waiting for its handshake already counts): the limit is reached.
    let mut a = Conn::open("127.0.0.1", p.addr).await;
    let mut b = Conn::open("127.0.0.2", p.addr).await;
    assert_eq!(a.get("/").await, Some(StatusCode::OK));
    assert_eq!(b.get("/").await, Some(StatusCode::OK));
    let held_tls = TcpStream::connect(tls_addr).await.unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            open_gauge(&p, "https").await == 1.0
        })
        .await
    );
    // Over the limit, from any address, on either listener.
    assert!(closed_unanswered(connect_from("127.0.0.3", p.addr).await).await);
    assert!(closed_unanswered(TcpStream::connect(tls_addr).await.unwrap()).await);
    assert_eq!(refused_total(&p, "max_connections").await, 2.0);
    // Established ones keep working.
    assert_eq!(a.get("/").await, Some(StatusCode::OK));
    assert_eq!(b.get("/").await, Some(StatusCode::OK));
    assert_eq!(open_gauge(&p, "http").await, 2.0);
    assert_eq!(open_gauge(&p, "https").await, 1.0);

    // Raised on reload: new connections are admitted again.
    reload_with(&p, "max_connections = 3", "max_connections = 5").await;
    let mut c = Conn::open("127.0.0.3", p.addr).await;
    assert_eq!(c.get("/").await, Some(StatusCode::OK));
    let held_tls2 = TcpStream::connect(tls_addr).await.unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            open_gauge(&p, "https").await == 2.0
        })
        .await
    );
    // Five open now: the sixth is refused.
    assert!(closed_unanswered(TcpStream::connect(p.addr).await.unwrap()).await);
    assert_eq!(refused_total(&p, "max_connections").await, 3.0);
    drop((held_tls, held_tls2));
}

/// Issue 17 item 7: upgraded connections are connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_count_as_open_connections_and_against_the_limit() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let up = Upstream::start("up").await;
    let p = TestProxy::start_with("max_connections = 6", &[Svc::new("web", &[&up], &[&up])]).await;
    let mut sockets = Vec::new();
    for i in 0..5 {
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", p.addr))
            .await
            .unwrap();
        ws.send(Message::text(format!("hi {i}"))).await.unwrap();
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            Message::text(format!("hi {i}"))
        );
        sockets.push(ws);
    }
    let mut keep_alive = Conn::open("127.0.0.1", p.addr).await;
    assert_eq!(keep_alive.get("/").await, Some(StatusCode::OK));
    assert!(
        eventually(Duration::from_secs(10), || async {
            open_gauge(&p, "http").await == 6.0
        })
        .await,
        "gauge: {}",
        open_gauge(&p, "http").await
    );
    // Six open: the seventh is refused.
    assert!(closed_unanswered(TcpStream::connect(p.addr).await.unwrap()).await);
    assert_eq!(refused_total(&p, "max_connections").await, 1.0);
    // The WebSockets still work; closing them gives their places back.
    for ws in &mut sockets {
        ws.send(Message::text("again")).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("again"));
    }
    for mut ws in sockets {
        ws.close(None).await.unwrap();
    }
    assert!(
        eventually(Duration::from_secs(10), || async {
            open_gauge(&p, "http").await == 1.0
        })
        .await,
        "gauge: {}",
        open_gauge(&p, "http").await
    );
    let mut next = Conn::open("127.0.0.1", p.addr).await;
    assert_eq!(next.get("/").await, Some(StatusCode::OK));
}

// ===== Overload =====

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 here.
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

fn clock_ticks_per_second() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

const OUT_OF_FDS: &str = "cannot accept connections: out of file descriptors";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_the_proxy_backs_off_logs_once_and_recovers() {
    let up = Upstream::start("up").await;
    let dir = TempDir::new("nofile");
    let config = dir.join("switchyard.toml");
    std::fs::write(
        &config,
        config_text(
            dir.path(),
            // Accepted connections that send nothing stay for the whole test.
            "workers = 1\nheader_read_timeout = \"120s\"\naccess_log = false",
            &[Svc::new("web", &[&up], &[&up])],
        ),
    )
    .unwrap();
    let p = tokio::task::spawn_blocking(move || ProxyProcess::spawn_with_nofile(&config, 64))
        .await
        .unwrap()
        .unwrap();
    let pid = p.child.id();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max open files") && l.split_whitespace().nth(3) == Some("64")),
        "{limits}"
    );

    // Established before the flood, its upstream connection pooled.
    let mut established = Conn::open("127.0.0.1", p.proxy).await;
    assert_eq!(established.get("/").await, Some(StatusCode::OK));

    // Flood: more connections than the proxy has descriptors for. Those it
    // cannot accept wait in the kernel's backlog.
    let mut flood = Vec::new();
    for _ in 0..100 {
        flood.push(TcpStream::connect(p.proxy).await.unwrap());
    }
    assert!(
        eventually(Duration::from_secs(20), || async {
            p.log_text().contains(OUT_OF_FDS)
        })
        .await,
        "never ran out of descriptors:\n{}",
        p.log_text()
    );
    let first_logged = Instant::now();

    // Established connections are still served.
    assert_eq!(established.get("/").await, Some(StatusCode::OK));

    // The accept loop backs off instead of spinning: measured as CPU time
    // over a window (a spinning loop burns a whole core).
    let hz = clock_ticks_per_second();
    let (t0, c0) = (Instant::now(), cpu_ticks(pid));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (elapsed, used) = (t0.elapsed(), cpu_ticks(pid) - c0);
    let share = used as f64 / hz as f64 / elapsed.as_secs_f64();
    eprintln!(
        "out of descriptors: {:.1} % of a core over {elapsed:?}",
        share * 100.0
    );
    assert!(
        share < 0.25,
        "the proxy used {:.0} % of a core while out of descriptors",
        share * 100.0
    );
    // Logged once per interval (10 s), not once per failed accept.
    let lines = p.log_text().matches(OUT_OF_FDS).count();
    let intervals = first_logged.elapsed().as_secs() / 10 + 1;
    assert!(
        lines as u64 <= intervals,
        "{lines} lines in {intervals} intervals:\n{}",
        p.log_text()
    );

    // Descriptors free up: new connections are served again.
    drop(flood);
    let recovered = eventually(Duration::from_secs(30), || async {
        let mut c = Conn::open("127.0.0.1", p.proxy).await;
        tokio::time::timeout(Duration::from_secs(3), c.get("/"))
            .await
            .ok()
            .flatten()
            == Some(StatusCode::OK)
    })
    .await;
    assert!(recovered, "never recovered:\n{}", p.log_text());
    assert_eq!(established.get("/").await, Some(StatusCode::OK));
    let admin = Admin::new(p.admin);
    let m = admin.metrics().await;
    let refused = metric(
        &m,
        "switchyard_connections_refused_total{reason=\"no_file_descriptors\"}",
    )
    .unwrap();
    assert!(refused >= 1.0, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_clients_that_stop_reading_leave_the_proxy_serving_others() {
    let up = Upstream::start("up").await;
    let p = TestProxy::start_with("access_log = false", &[Svc::new("web", &[&up], &[&up])]).await;
    let t0 = Instant::now();
    // Each asks for 4 MiB and reads nothing: its response stalls in the
    // socket buffers, holding one upstream connection.
    let mut stalled = Vec::new();
    for i in 0..1000 {
        let socket = TcpSocket::new_v4().unwrap();
        // A small receive window keeps what the kernel buffers small.
        socket.set_recv_buffer_size(4096).unwrap();
        let from = if i % 2 == 0 { "127.0.0.1" } else { "127.0.0.2" };
        socket
            .bind(SocketAddr::new(from.parse().unwrap(), 0))
            .unwrap();
        let mut s = socket.connect(p.addr).await.unwrap();
        s.write_all(b"GET /bytes/4194304 HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        stalled.push(s);
    }
    assert!(
        eventually(Duration::from_secs(60), || async {
            up.open_connections() >= 1000
        })
        .await,
        "upstream connections: {}",
        up.open_connections()
    );
    eprintln!("1000 stalled after {:?}", t0.elapsed());
    // One upstream connection each, no more.
    assert_eq!(up.open_connections(), 1000);
    // Others are served, small and large.
    let mut other = Conn::open("127.0.0.3", p.addr).await;
    for _ in 0..5 {
        assert_eq!(other.get("/").await, Some(StatusCode::OK));
    }
    let (s, _, body) = p.get("/bytes/1048576").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(body.len(), 1 << 20);
    assert_eq!(open_gauge(&p, "http").await, 1002.0);
    eprintln!("others served after {:?}", t0.elapsed());
    drop(stalled);
    assert!(
        eventually(Duration::from_secs(30), || async {
            open_gauge(&p, "http").await <= 2.0
        })
        .await
    );
}
