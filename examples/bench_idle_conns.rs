//! Opens many idle keep-alive client connections (memory benchmark in
//! `benches/load/run.sh`).
//!
//! `bench_idle_conns ADDR COUNT HOLD_SECS`: opens COUNT connections to ADDR,
//! sends one `GET /` on each and reads its response, prints
//! `ready OK_COUNT`, then keeps every connection open (idle) for HOLD_SECS
//! and exits. Raise `ulimit -n` first.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn one(addr: String) -> Option<TcpStream> {
    let mut s = TcpStream::connect(&addr).await.ok()?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
        .await
        .ok()?;
    // Read until the end of the (small, Content-Length framed) response.
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return head.starts_with("http/1.1 2").then_some(s);
            }
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() != 3 {
        eprintln!("usage: bench_idle_conns ADDR COUNT HOLD_SECS");
        std::process::exit(2);
    }
    let addr = args[0].clone();
    let count: usize = args[1].parse().unwrap_or(10_000);
    let hold: u64 = args[2].parse().unwrap_or(10);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async move {
        let mut conns = Vec::with_capacity(count);
        // Connect in batches so the listen backlog never overflows.
        for batch in 0..count.div_ceil(500) {
            let n = 500.min(count - batch * 500);
            let tasks: Vec<_> = (0..n).map(|_| tokio::spawn(one(addr.clone()))).collect();
            for t in tasks {
                if let Ok(Some(s)) = t.await {
                    conns.push(s);
                }
            }
        }
        println!("ready {}", conns.len());
        tokio::time::sleep(Duration::from_secs(hold)).await;
        drop(conns);
    });
}
