//! The `switchyard` command (SPEC §1): parse arguments, load and check the
//! config before anything binds, build the runtime, run until a signal.

#![warn(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use switchyard::app::{self, StartOptions};
use switchyard::config::{self, Config};
use switchyard::workers::Workers;

/// jemalloc keeps size classes apart and, with the settings baked in by
/// `.cargo/config.toml`, gives freed pages back to the OS within a second:
/// the buffers of parked idle connections really leave the RSS (10 000 idle
/// connections: 82 MiB, against 133 MiB with glibc, which keeps them), and
/// it cuts about 4 % of the instructions per request.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Debug, Parser)]
#[command(
    name = "switchyard",
    version,
    about = "Layer-7 reverse proxy for blue/green and canary releases"
)]
struct Cli {
    /// Config file (same as `run --config FILE`).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Proxy on 127.0.0.1:8080 and admin on 127.0.0.1:9901 in front of two
    /// built-in upstreams (blue v1, green v2). No files needed.
    Demo,
    /// Run with a config file.
    Run {
        /// Start from `initial` if the state file is unreadable (it is moved aside).
        #[arg(long)]
        ignore_state: bool,
    },
    /// Validate a config file (and the state, certificate and token files it names).
    Check,
    /// Admin API client for pipelines.
    Ctl(switchyard::ctl::CtlArgs),
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

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

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Ctl(args)) => {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("switchyard ctl: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let code = rt.block_on(switchyard::ctl::run(args, cli.config.as_deref()));
            ExitCode::from(u8::try_from(code).unwrap_or(1))
        }
        Some(Command::Check) => match cli.config {
            Some(path) => check(&path),
            None => usage("check needs --config FILE"),
        },
        Some(Command::Demo) => {
            init_logging(cli.log_format);
            demo()
        }
        Some(Command::Run { ignore_state }) => match cli.config {
            Some(path) => {
                init_logging(cli.log_format);
                run(&path, ignore_state)
            }
            None => usage("run needs --config FILE"),
        },
        None => match cli.config {
            Some(path) => {
                init_logging(cli.log_format);
                run(&path, false)
            }
            None => usage("give a command (demo, run, check, ctl) or --config FILE; see --help"),
        },
    }
}

fn usage(msg: &str) -> ExitCode {
    eprintln!("switchyard: {msg}");
    ExitCode::from(2)
}

/// `switchyard check`: every problem as `FILE:line: message`, exit 1; or ok.
fn check(path: &Path) -> ExitCode {
    let config = match config::load(path) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::FAILURE;
        }
    };
    let mut problems = Vec::new();
    let store = switchyard::store::FileStore::new(config.state.path.clone());
    if let Err(e) = switchyard::store::StateStore::load(&store) {
        problems.push(e.to_string());
    }
    if config.proxy.tls_listen.is_some() {
        if let Err(errors) = switchyard::tls::server_config(&config.proxy.tls) {
            for e in errors {
                problems.push(format!("{}:{}: {e}", path.display(), tls_line(&config, &e)));
            }
        }
    }
    if let Some(f) = &config.admin.token_file {
        if let Err(e) = switchyard::auth::Tokens::load(f) {
            problems.push(e);
        }
    }
    for svc in &config.services {
        if svc.upstream_insecure_skip_verify {
            eprintln!(
                "{}:{}: warning: service \"{}\": upstream_insecure_skip_verify = true: \
                 backend TLS certificates are NOT verified",
                path.display(),
                svc.line,
                svc.name
            );
        }
        if let Some(ca) = &svc.upstream_ca {
            if let Err(e) = switchyard::tls::UpstreamTls::new(Some(ca), false) {
                problems.push(format!(
                    "{}:{}: service \"{}\": upstream_ca: {e}",
                    path.display(),
                    svc.line,
                    svc.name
                ));
            }
        }
    }
    if problems.is_empty() {
        println!(
            "{}: ok ({} services)",
            path.display(),
            config.services.len()
        );
        ExitCode::SUCCESS
    } else {
        for p in problems {
            eprintln!("{p}");
        }
        ExitCode::FAILURE
    }
}

/// The config line of the `[[proxy.tls]]` entry an error is about.
fn tls_line(config: &Config, error: &str) -> usize {
    config
        .proxy
        .tls
        .iter()
        .find(|t| {
            error.starts_with(&t.cert.display().to_string())
                || error.starts_with(&t.key.display().to_string())
        })
        .map_or(0, |t| t.line)
}

fn run(path: &Path, ignore_state: bool) -> ExitCode {
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

fn demo() -> ExitCode {
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
        let (blue, green) = match switchyard::demo::start_upstreams().await {
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
        let code = serve(config, opts, Some(switchyard::demo::instructions)).await;
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
