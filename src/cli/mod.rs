//! The `switchyard` command (SPEC §1): parse arguments, load and check the
//! config before anything binds, build the runtime, run until a signal.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

mod check;
pub(crate) mod ctl;
pub(crate) mod demo;
mod run;

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
    Ctl(ctl::CtlArgs),
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

/// Runs the command line; the binary's `main` is only this.
pub fn main() -> ExitCode {
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
            let code = rt.block_on(ctl::run(args, cli.config.as_deref()));
            ExitCode::from(u8::try_from(code).unwrap_or(1))
        }
        Some(Command::Check) => match cli.config {
            Some(path) => check::check(&path),
            None => usage("check needs --config FILE"),
        },
        Some(Command::Demo) => {
            init_logging(cli.log_format);
            run::demo()
        }
        Some(Command::Run { ignore_state }) => match cli.config {
            Some(path) => {
                init_logging(cli.log_format);
                run::run(&path, ignore_state)
            }
            None => usage("run needs --config FILE"),
        },
        None => match cli.config {
            Some(path) => {
                init_logging(cli.log_format);
                run::run(&path, false)
            }
            None => usage("give a command (demo, run, check, ctl) or --config FILE; see --help"),
        },
    }
}

fn usage(msg: &str) -> ExitCode {
    eprintln!("switchyard: {msg}");
    ExitCode::from(2)
}
