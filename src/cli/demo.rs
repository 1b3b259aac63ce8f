//! `switchyard demo`: two built-in upstreams in the same process, blue
//! answering `blue v1` and green `green v2`, each with `/healthz`, and the
//! proxy in front of them on the SPEC's default ports.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// Serves `body` on every path (and `ok` on `/healthz`) until the task is
/// dropped. Used by the demo and the benchmarks.
pub(crate) async fn serve_upstream(listener: TcpListener, body: &'static str) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let svc = service_fn(
                move |req: hyper::Request<hyper::body::Incoming>| async move {
                    let text: &'static str = if req.uri().path() == "/healthz" {
                        "ok\n"
                    } else {
                        body
                    };
                    let mut resp = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
                    *resp.status_mut() = StatusCode::OK;
                    resp.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static("text/plain; charset=utf-8"),
                    );
                    Ok::<_, Infallible>(resp)
                },
            );
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .with_upgrades()
                .await;
        });
    }
}

/// Starts the two demo upstreams on ephemeral loopback ports.
pub(crate) async fn start_upstreams() -> std::io::Result<(SocketAddr, SocketAddr)> {
    let blue = TcpListener::bind("127.0.0.1:0").await?;
    let green = TcpListener::bind("127.0.0.1:0").await?;
    let (b, g) = (blue.local_addr()?, green.local_addr()?);
    tokio::spawn(serve_upstream(blue, "blue v1\n"));
    tokio::spawn(serve_upstream(green, "green v2\n"));
    Ok((b, g))
}

/// The lines the demo prints to try it.
pub(crate) fn instructions(proxy: SocketAddr, admin: SocketAddr) -> String {
    format!(
        "\
switchyard demo: proxy on http://{proxy}, admin API on http://{admin}

Operator page: http://{admin}/ui/   (open it in a browser)

Try:
  curl {proxy}/                                   # blue v1
  curl -X POST {admin}/api/v1/services/demo/switch -d '{{\"to\":\"green\"}}'
  curl {proxy}/                                   # green v2
  curl -X POST {admin}/api/v1/services/demo/rollback
  curl -X POST {admin}/api/v1/services/demo/split -d '{{\"green\":10}}'
  curl -H 'x-switchyard-pool: green' {proxy}/     # preview the other pool
  curl {admin}/api/v1/services/demo
  curl {admin}/api/v1/services/demo/history
  curl {admin}/api/v1/stats                       # req/s and 5xx ratio per pool
  switchyard ctl --admin http://{admin} status demo --watch
  curl {admin}/metrics

Ctrl-C to stop.
"
    )
}
