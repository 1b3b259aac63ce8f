//! The upstream connection pool: keep-alive connections to backends are
//! reused across requests of every shape, a connection the backend closed
//! while idle is noticed at checkout (no error, no failed request), and an
//! exchange the client abandons closes its upstream connection instead of
//! pooling it. The upstream connection is driven by the request's own task
//! (issue 16), so these are what that must keep true.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Connections an upstream accepted in all, and has open now.
#[derive(Default)]
struct Counts {
    accepted: AtomicUsize,
    open: AtomicUsize,
}

/// A keep-alive HTTP/1.1 upstream counting its connections: `/big/N`
/// streams N bytes in 64 KiB chunks, `/count` answers the length of the
/// request body, `/empty` answers 204, anything else `ok`.
async fn counting_upstream() -> (SocketAddr, Arc<Counts>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let counts = Arc::new(Counts::default());
    let c = Arc::clone(&counts);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            c.accepted.fetch_add(1, Ordering::SeqCst);
            c.open.fetch_add(1, Ordering::SeqCst);
            let c = Arc::clone(&c);
            tokio::spawn(async move {
                let svc = service_fn(|req: Request<hyper::body::Incoming>| async move {
                    let path = req.uri().path().to_string();
                    let body = if let Some(n) = path.strip_prefix("/big/") {
                        let n: usize = n.parse().unwrap_or(0);
                        let chunks = (0..n.div_ceil(65536)).map(move |i| {
                            let len = (n - i * 65536).min(65536);
                            Ok::<_, Infallible>(Frame::data(Bytes::from(vec![b'x'; len])))
                        });
                        StreamBody::new(futures_util::stream::iter(chunks)).boxed()
                    } else if path == "/count" {
                        let n = req.into_body().collect().await.unwrap().to_bytes().len();
                        Full::new(Bytes::from(n.to_string())).boxed()
                    } else {
                        Full::new(Bytes::from_static(b"ok")).boxed()
                    };
                    let mut resp = Response::new(body);
                    if path == "/empty" {
                        *resp.status_mut() = StatusCode::NO_CONTENT;
                    }
                    Ok::<_, Infallible>(resp)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
                c.open.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    (addr, counts)
}

async fn send(p: &TestProxy, method: Method, path: &str, body: Body) -> (StatusCode, Bytes) {
    let req = Request::builder()
        .method(method)
        .uri(p.url(path))
        .body(body)
        .unwrap();
    let resp = p.client.request(req).await.unwrap();
    let status = resp.status();
    (status, resp.into_body().collect().await.unwrap().to_bytes())
}

/// A streamed request body of `n` bytes in 16 KiB chunks, no length given.
fn streamed(n: usize) -> Body {
    let chunks = (0..n.div_ceil(16384)).map(move |i| {
        let len = (n - i * 16384).min(16384);
        Ok::<_, hyper::Error>(Frame::data(Bytes::from(vec![b'y'; len])))
    });
    StreamBody::new(futures_util::stream::iter(chunks)).boxed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_upstream_connection_serves_requests_of_every_shape_one_after_another() {
    let (addr, counts) = counting_upstream().await;
    let p = TestProxy::start(&[Svc::addrs("web", &[addr], &[addr])]).await;
    for i in 0..20 {
        let (s, b) = send(&p, Method::GET, "/", empty()).await;
        assert_eq!((s, &b[..]), (StatusCode::OK, &b"ok"[..]), "request {i}");
    }
    for _ in 0..3 {
        let (s, b) = send(&p, Method::GET, "/big/1048576", empty()).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(b.len(), 1_048_576, "a streamed 1 MiB body arrives whole");
        let (s, b) = send(&p, Method::POST, "/count", streamed(300_000)).await;
        assert_eq!((s, &b[..]), (StatusCode::OK, &b"300000"[..]));
        let (s, b) = send(&p, Method::HEAD, "/big/1000", empty()).await;
        assert_eq!((s, b.len()), (StatusCode::OK, 0));
        let (s, _) = send(&p, Method::GET, "/empty", empty()).await;
        assert_eq!(s, StatusCode::NO_CONTENT);
    }
    assert_eq!(
        counts.accepted.load(Ordering::SeqCst),
        1,
        "every exchange returned its upstream connection to the pool"
    );
    p.shutdown().await;
}

/// An upstream that answers one request per connection as if keeping it
/// alive (no `Connection: close`), then closes it, as backends do with
/// idle keep-alive connections; counts connections accepted and closed.
async fn closing_upstream() -> (SocketAddr, Arc<Counts>, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let counts = Arc::new(Counts::default());
    let closed = Arc::new(AtomicUsize::new(0));
    let (c, d) = (Arc::clone(&counts), Arc::clone(&closed));
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            c.accepted.fetch_add(1, Ordering::SeqCst);
            let d = Arc::clone(&d);
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nserved")
                    .await;
                drop(stream);
                d.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    (addr, counts, closed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_the_backend_closed_is_discarded_at_checkout_without_an_error() {
    let (addr, counts, closed) = closing_upstream().await;
    let p = TestProxy::start(&[Svc::addrs("web", &[addr], &[addr])]).await;
    for i in 1..=5 {
        let (s, b) = send(&p, Method::GET, "/", empty()).await;
        assert_eq!((s, &b[..]), (StatusCode::OK, &b"served"[..]), "request {i}");
        // The backend has closed the connection the proxy pooled.
        assert!(
            eventually(Duration::from_secs(10), || async {
                closed.load(Ordering::SeqCst) == i
            })
            .await
        );
    }
    assert_eq!(counts.accepted.load(Ordering::SeqCst), 5);
    let m = p.admin.metrics().await;
    for kind in ["reset", "truncated", "connect", "timeout"] {
        let name = format!(
            "switchyard_upstream_errors_total{{kind=\"{kind}\",pool=\"blue\",service=\"web\"}}"
        );
        assert_eq!(
            metric(&m, &name).unwrap_or(0.0),
            0.0,
            "a closed idle connection is dropped at checkout, never tried: {kind}"
        );
    }
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_the_client_abandons_closes_its_upstream_connection() {
    let (addr, counts) = counting_upstream().await;
    let p = TestProxy::start(&[Svc::addrs("web", &[addr], &[addr])]).await;
    // A raw client reads the head of a 64 MiB response, then leaves.
    let mut c = TcpStream::connect(p.addr).await.unwrap();
    c.write_all(b"GET /big/67108864 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 16384];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = c.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before the head");
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got.starts_with(b"HTTP/1.1 200"));
    assert_eq!(counts.open.load(Ordering::SeqCst), 1);
    drop(c);
    // Not pooled with 64 MiB unread: closed.
    assert!(
        eventually(Duration::from_secs(10), || async {
            counts.open.load(Ordering::SeqCst) == 0
        })
        .await,
        "the abandoned exchange's upstream connection was closed"
    );
    let (s, b) = send(&p, Method::GET, "/", empty()).await;
    assert_eq!((s, &b[..]), (StatusCode::OK, &b"ok"[..]));
    assert_eq!(
        counts.accepted.load(Ordering::SeqCst),
        2,
        "a new connection"
    );
    p.shutdown().await;
}
