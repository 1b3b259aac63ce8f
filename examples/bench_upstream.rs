//! A fast upstream for the load benchmarks (`benches/load/run.sh`).
//!
//! `cargo run --profile perf --example bench_upstream -- BLUE_PORT GREEN_PORT [THREADS]`
//!
//! Serves blue on `BLUE_PORT` and green on `GREEN_PORT` (127.0.0.1),
//! HTTP/1.1 and h2c (prior knowledge):
//! - `GET /` (any other path): a fixed 10-byte body, `blue ok 1\n` / `green ok\n`;
//! - `GET /64k`: a 64 KiB body;
//! - `/upload` (any method): reads and discards the request body, answers
//!   with the byte count (for the streamed-upload memory test);
//! - `/healthz`: `ok`.
//!
//! Every response is built from static bytes: the upstream should cost as
//! little as possible so the proxy in front of it is what gets measured.

use std::convert::Infallible;

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

static BIG: [u8; 64 * 1024] = [b'x'; 64 * 1024];

async fn handle(req: Request<Incoming>, small: &'static [u8]) -> Response<Full<Bytes>> {
    let body = match req.uri().path() {
        "/64k" => Bytes::from_static(&BIG),
        "/healthz" => Bytes::from_static(b"ok\n"),
        "/upload" => {
            let mut n: u64 = 0;
            let mut body = req.into_body();
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => {
                        if let Some(d) = f.data_ref() {
                            n += d.len() as u64;
                        }
                    }
                    Err(_) => break,
                }
            }
            Bytes::from(format!("{n}\n"))
        }
        _ => Bytes::from_static(small),
    };
    let mut resp = Response::new(Full::new(body));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain"),
    );
    resp
}

async fn serve(listener: TcpListener, small: &'static [u8]) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let svc =
                service_fn(move |req| async move { Ok::<_, Infallible>(handle(req, small).await) });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let port = |i: usize| -> u16 {
        args.get(i).and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            eprintln!("usage: bench_upstream BLUE_PORT GREEN_PORT [THREADS]");
            std::process::exit(2)
        })
    };
    let (blue, green) = (port(0), port(1));
    let threads = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(2usize);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async move {
        let b = TcpListener::bind(("127.0.0.1", blue))
            .await
            .expect("bind blue");
        let g = TcpListener::bind(("127.0.0.1", green))
            .await
            .expect("bind green");
        tokio::spawn(serve(g, b"green ok\n\n"));
        serve(b, b"blue ok 1\n").await;
    });
}
