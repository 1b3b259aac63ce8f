//! `switchyard run` and `demo`: build the runtimes, start, serve until a signal.

use std::path::Path;
use std::process::ExitCode;

use crate::app::{self, StartOptions};
use crate::config::{self, Config};
use crate::data_plane::workers::Workers;

/// The runtimes for `workers` worker threads (0 = one per core): with one,
/// everything runs on a single current-thread runtime; with more, the main
/// thread keeps the control plane and each worker thread serves clients on
/// its own runtime (`switchyard::workers`).
fn runtimes(workers: usize) -> std::io::Result<(tokio::runtime::Runtime, Option<Workers>)> {
    let n = match workers {
        0 => std::thread::available_parallelism().map_or(1, usize::from),
        n => n,
    };
    let main = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    if n <= 1 {
        return Ok((main, None));
    }
    Ok((main, Some(Workers::start(n)?)))
}

pub(super) fn run(path: &Path, ignore_state: bool) -> ExitCode {
    let config = match config::load(path) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::FAILURE;
        }
    };
    let (rt, workers) = match runtimes(config.proxy.workers) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("switchyard: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let opts = StartOptions {
        config_path: Some(path.to_path_buf()),
        ignore_state,
        workers: workers
            .as_ref()
            .map(|w| w.handles().to_vec())
            .unwrap_or_default(),
    };
    let code = rt.block_on(serve(config, opts, None));
    if let Some(w) = workers {
        w.stop();
    }
    code
}

pub(super) fn demo() -> ExitCode {
    let (rt, workers) = match runtimes(0) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("switchyard: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let handles = workers
        .as_ref()
        .map(|w| w.handles().to_vec())
        .unwrap_or_default();
    let code = rt.block_on(async {
        let (blue, green) = match super::demo::start_upstreams().await {
            Ok(a) => a,
            Err(e) => {
                eprintln!("switchyard demo: cannot start the demo upstreams: {e}");
                return ExitCode::FAILURE;
            }
        };
        let mut config = Config::demo(blue, green);
        // A fresh state per demo run, so it always starts on blue.
        let dir = std::env::temp_dir().join(format!("switchyard-demo-{}", std::process::id()));
        config.state.path = dir.join("state.json");
        let opts = StartOptions {
            workers: handles,
            ..StartOptions::default()
        };
        let code = serve(config, opts, Some(super::demo::instructions)).await;
        let _ = std::fs::remove_dir_all(&dir);
        code
    });
    if let Some(w) = workers {
        w.stop();
    }
    code
}

/// Starts, prints the demo instructions if any, and runs until SIGTERM or
/// SIGINT; SIGHUP reloads.
async fn serve(
    config: Config,
    opts: StartOptions,
    instructions: Option<fn(std::net::SocketAddr, std::net::SocketAddr) -> String>,
) -> ExitCode {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        eprintln!("switchyard: cannot install signal handlers");
        return ExitCode::FAILURE;
    };
    let running = match app::start(config, opts).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("switchyard: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(f) = instructions {
        println!("{}", f(running.proxy_addr, running.admin_addr));
    }
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading");
                let _ = running.control.reload().await;
            }
        }
    }
    running.shutdown().await;
    ExitCode::SUCCESS
}
