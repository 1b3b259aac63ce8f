//! `switchyard ctl`: the admin API client for pipelines (SPEC §1).
//!
//! Every subcommand is one admin API call (`wait-healthy` polls one), so
//! what the server accepts or refuses is exactly what the API would. Exit
//! status, which pipelines branch on:
//!
//! | code | meaning |
//! | --- | --- |
//! | 0 | done |
//! | 1 | refused by the server (its message printed), or `wait-healthy` timed out |
//! | 2 | usage error: bad arguments, bad `--admin` URL, unreadable token file |
//! | 3 | cannot reach the admin API (refused, reset, timed out, not HTTP) |
//! | 4 | `rollout status --wait`: the rollout was rolled back or aborted |
//! | 5 | `rollout status --wait`: still running at `--timeout` |

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Args, Subcommand};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

/// How long one admin API call may take before ctl gives up (exit 3).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// `switchyard ctl` options.
#[derive(Debug, Args)]
pub(crate) struct CtlArgs {
    /// Admin API base URL (`http://HOST:PORT`, optionally with a path
    /// prefix). Default: the config's `admin.listen` with `--config FILE`,
    /// else http://127.0.0.1:9901.
    #[arg(long, global = true, env = "SWITCHYARD_ADMIN")]
    pub(crate) admin: Option<String>,
    /// File holding the bearer token (a line as in the server's
    /// `token_file`: `NAME:SECRET` or `SECRET`; the first one is used).
    /// Default: `$SWITCHYARD_TOKEN`, else the config's `admin.token_file`
    /// with `--config FILE`.
    #[arg(long, global = true, env = "SWITCHYARD_TOKEN_FILE")]
    pub(crate) token_file: Option<PathBuf>,
    /// Print the server's JSON instead of a table.
    #[arg(long, global = true)]
    pub(crate) json: bool,
    /// Apply only if the service is still at this generation (sends
    /// `If-Match`; a stale generation is refused with 412).
    #[arg(long, global = true, alias = "if-match", value_name = "N")]
    pub(crate) if_generation: Option<u64>,
    /// Reason recorded in the history.
    #[arg(long, global = true)]
    pub(crate) reason: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub(crate) command: CtlCommand,
}

/// `switchyard ctl` subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum CtlCommand {
    /// Show one service, or all: weights, generation, pools and backends with health.
    Status {
        /// Service name.
        service: Option<String>,
        /// Keep printing: the state again on every routing change, with
        /// this replica's req/s and 5xx ratio per pool, from the admin
        /// API's event stream (`/api/v1/events`); reconnects when the
        /// stream is lost. Stop with Ctrl-C.
        #[arg(long)]
        watch: bool,
    },
    /// Send all traffic of a service to one pool.
    Switch {
        /// Service name.
        service: String,
        /// `blue` or `green`.
        color: String,
        /// Even if the pool has no healthy backend.
        #[arg(long)]
        force: bool,
    },
    /// Split traffic: percent to green (0-100, up to two decimals).
    Split {
        /// Service name.
        service: String,
        /// Percent of traffic to green.
        #[arg(long, value_name = "PCT")]
        green: f64,
        /// Even if the pool has no healthy backend.
        #[arg(long)]
        force: bool,
    },
    /// All traffic back to the previous pool (or to a generation's weights).
    Rollback {
        /// Service name.
        service: String,
        /// Restore the weights of this generation.
        #[arg(long, value_name = "N")]
        to_generation: Option<u64>,
    },
    /// Replace the backends of a pool.
    SetPool {
        /// Service name.
        service: String,
        /// `blue` or `green`.
        color: String,
        /// `host:port` (or `https://host:port`), one or more.
        #[arg(required = true, value_name = "ADDR")]
        backends: Vec<String>,
        /// Even if the pool takes traffic.
        #[arg(long)]
        force: bool,
    },
    /// Show the targeting rules of a service, or replace them with
    /// `--set FILE.json` (`{"rules":[…]}` or a bare `[…]`; `[]` removes all).
    Rules {
        /// Service name.
        service: String,
        /// Replace the rules with the list in this JSON file.
        #[arg(long, value_name = "FILE.json")]
        set: Option<std::path::PathBuf>,
    },
    /// Show a service's traffic mirror and its counters, start or change
    /// it (`--to POOL --percent N`), or stop it (`--off`).
    Mirror {
        /// Service name.
        service: String,
        /// The pool copies go to (the idle one).
        #[arg(
            long,
            value_name = "POOL",
            requires = "percent",
            conflicts_with = "off"
        )]
        to: Option<String>,
        /// Percent of the requests served by the other pool to copy.
        #[arg(long, value_name = "PCT", requires = "to", conflicts_with = "off")]
        percent: Option<f64>,
        /// Methods to copy, comma-separated (default GET,HEAD,OPTIONS).
        #[arg(long, value_name = "LIST", requires = "to", value_delimiter = ',')]
        methods: Option<Vec<String>>,
        /// Stop mirroring.
        #[arg(long)]
        off: bool,
    },
    /// Routing history of a service, newest first.
    History {
        /// Service name.
        service: String,
    },
    /// Re-read the config file.
    Reload,
    /// Progressive rollouts (SPEC §10): start, status, pause, resume,
    /// promote, abort, history.
    Rollout {
        /// What to do.
        #[command(subcommand)]
        command: RolloutCommand,
    },
    /// Fleet mode: the shared state in etcd.
    State {
        /// What to do.
        #[command(subcommand)]
        command: StateCommand,
    },
    /// Wait until every backend of a pool is healthy (the step after
    /// deploying to the idle pool); exit 1 if it does not happen in time.
    WaitHealthy {
        /// Service name.
        service: String,
        /// `blue` or `green`.
        color: String,
        /// How long to wait (`60s`, `2m`, ...).
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        timeout: Duration,
        /// How often to look.
        #[arg(long, default_value = "500ms", value_parser = parse_duration)]
        interval: Duration,
    },
}

/// `switchyard ctl rollout …`.
#[derive(Debug, Subcommand)]
pub(crate) enum RolloutCommand {
    /// Start a rollout of the idle pool with a plan.
    Start {
        /// Service name.
        service: String,
        /// A `[[rollout_plan]]` name from the server's config.
        #[arg(
            long,
            value_name = "NAME",
            required_unless_present = "plan_file",
            conflicts_with = "plan_file"
        )]
        plan: Option<String>,
        /// An inline plan: a JSON file `{"steps":[…],"analysis":{…}}`.
        #[arg(long, value_name = "FILE.json")]
        plan_file: Option<PathBuf>,
    },
    /// Show the current (or last) rollout; with `--wait`, wait for it to
    /// end: exit 0 succeeded, 4 rolled back or aborted, 5 still running at
    /// `--timeout`.
    Status {
        /// Service name.
        service: String,
        /// Wait until the rollout ends.
        #[arg(long)]
        wait: bool,
        /// How long `--wait` waits (`30m`, `600s`, ...).
        #[arg(long, default_value = "10m", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Stop progress (the analysis keeps running).
    Pause {
        /// Service name.
        service: String,
    },
    /// Continue after a pause.
    Resume {
        /// Service name.
        service: String,
    },
    /// Skip to the next step (past a pause or a gate); `--full`: 100 % now.
    Promote {
        /// Service name.
        service: String,
        /// Straight to 100 % (the analysis is skipped).
        #[arg(long)]
        full: bool,
    },
    /// Stop the rollout: the canary back to 0 %.
    Abort {
        /// Service name.
        service: String,
    },
    /// Past rollouts, newest first.
    History {
        /// Service name.
        service: String,
    },
}

/// `switchyard ctl state ...`.
#[derive(Debug, Subcommand)]
pub(crate) enum StateCommand {
    /// Move a single-replica state file into etcd, keeping generations and
    /// history (through a fleet replica's admin API). A service etcd holds
    /// at the same or a newer generation is left alone.
    Import {
        /// The state file (`[state] path` of the single replica).
        #[arg(long, value_name = "FILE")]
        from: std::path::PathBuf,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("`{s}`: {e} (expected e.g. 60s, 2m, 500ms)"))
}

/// Why a ctl command did not succeed; each maps to an exit status.
#[derive(Debug)]
enum Failure {
    /// The server answered with an error (exit 1). `body` is its JSON.
    Refused { message: String, body: Value },
    /// `wait-healthy` ran out of time (exit 1).
    TimedOut(String),
    /// Bad arguments (exit 2).
    Usage(String),
    /// No usable answer from the admin API (exit 3).
    Unreachable(String),
    /// `rollout status --wait` ended with this exit status (4, 5); the
    /// output is printed as on success.
    Rollout { code: i32, output: String },
}

impl Failure {
    fn exit_code(&self) -> i32 {
        match self {
            Failure::Refused { .. } | Failure::TimedOut(_) => 1,
            Failure::Usage(_) => 2,
            Failure::Unreachable(_) => 3,
            Failure::Rollout { code, .. } => *code,
        }
    }
}

/// Runs a ctl command; returns the process exit status. `config`: the
/// `--config FILE` given to `switchyard`, whose `[admin]` section supplies
/// the address and token file when the options do not.
pub(crate) async fn run(args: CtlArgs, config: Option<&std::path::Path>) -> i32 {
    match run_inner(&args, config).await {
        Ok(out) => {
            print!("{out}");
            0
        }
        Err(failure) => {
            match &failure {
                Failure::Refused { message, body } => {
                    if args.json {
                        println!("{}", pretty(body));
                    }
                    eprintln!("switchyard ctl: {message}");
                }
                Failure::TimedOut(m) | Failure::Usage(m) | Failure::Unreachable(m) => {
                    eprintln!("switchyard ctl: {m}")
                }
                Failure::Rollout { output, .. } => print!("{output}"),
            }
            failure.exit_code()
        }
    }
}

async fn run_inner(args: &CtlArgs, config: Option<&std::path::Path>) -> Result<String, Failure> {
    let admin = Admin::new(args, config)?;
    let with_reason = |mut body: Value| {
        if let (Some(r), Some(m)) = (&args.reason, body.as_object_mut()) {
            m.insert("reason".into(), Value::from(r.clone()));
        }
        body
    };
    let service_path = |s: &str| format!("/api/v1/services/{}", segment(s));
    let (method, path, body) = match &args.command {
        CtlCommand::Status {
            service,
            watch: true,
        } => return watch(&admin, args.json, service.as_deref()).await,
        CtlCommand::Status { service: None, .. } => {
            (Method::GET, "/api/v1/services".to_string(), None)
        }
        CtlCommand::Status {
            service: Some(s), ..
        } => (Method::GET, service_path(s), None),
        CtlCommand::Switch {
            service,
            color,
            force,
        } => (
            Method::POST,
            service_path(service) + "/switch",
            Some(with_reason(json!({ "to": color, "force": force }))),
        ),
        CtlCommand::Split {
            service,
            green,
            force,
        } => (
            Method::POST,
            service_path(service) + "/split",
            Some(with_reason(json!({ "green": green, "force": force }))),
        ),
        CtlCommand::Rollback {
            service,
            to_generation,
        } => {
            let body = match to_generation {
                Some(g) => json!({ "to_generation": g }),
                None => json!({}),
            };
            (
                Method::POST,
                service_path(service) + "/rollback",
                Some(with_reason(body)),
            )
        }
        CtlCommand::SetPool {
            service,
            color,
            backends,
            force,
        } => (
            Method::PUT,
            format!("{}/pools/{}", service_path(service), segment(color)),
            Some(with_reason(json!({ "backends": backends, "force": force }))),
        ),
        CtlCommand::History { service } => (Method::GET, service_path(service) + "/history", None),
        CtlCommand::Rules { service, set: None } => {
            (Method::GET, service_path(service) + "/rules", None)
        }
        CtlCommand::Rules {
            service,
            set: Some(file),
        } => (
            Method::PUT,
            service_path(service) + "/rules",
            Some(with_reason(read_rules_file(file)?)),
        ),
        CtlCommand::Mirror {
            service,
            to: Some(to),
            percent: Some(percent),
            methods,
            ..
        } => {
            let mut body = json!({ "to": to, "percent": percent });
            if let (Some(m), Some(o)) = (methods, body.as_object_mut()) {
                o.insert("methods".into(), json!(m));
            }
            (
                Method::PUT,
                service_path(service) + "/mirror",
                Some(with_reason(body)),
            )
        }
        CtlCommand::Mirror {
            service, off: true, ..
        } => (
            Method::DELETE,
            service_path(service) + "/mirror",
            Some(with_reason(json!({}))),
        ),
        CtlCommand::Mirror { service, .. } => {
            (Method::GET, service_path(service) + "/mirror", None)
        }
        CtlCommand::Reload => (Method::POST, "/api/v1/reload".to_string(), None),
        CtlCommand::Rollout { command } => return rollout(&admin, args, command).await,
        CtlCommand::State {
            command: StateCommand::Import { from },
        } => {
            let text = std::fs::read(from)
                .map_err(|e| Failure::Usage(format!("{}: {e}", from.display())))?;
            let value: Value = serde_json::from_slice(&text)
                .map_err(|e| Failure::Usage(format!("{}: not JSON: {e}", from.display())))?;
            (
                Method::POST,
                "/api/v1/state/import".to_string(),
                Some(value),
            )
        }
        CtlCommand::WaitHealthy {
            service,
            color,
            timeout,
            interval,
        } => return wait_healthy(&admin, args.json, service, color, *timeout, *interval).await,
    };
    let value = admin.call(method, &path, body, args.if_generation).await?;
    // Fleet mode: `status` also shows every replica and whether it is synced.
    let replicas = match &args.command {
        CtlCommand::Status { service: None, .. } => admin
            .call(Method::GET, "/api/v1/replicas", None, None)
            .await
            .ok(),
        _ => None,
    };
    if args.json {
        if let Some(r) = replicas {
            return Ok(format!(
                "{}\n",
                pretty(&json!({"services": value, "fleet": r}))
            ));
        }
        return Ok(format!("{}\n", pretty(&value)));
    }
    Ok(match &args.command {
        CtlCommand::Status { service: None, .. } => {
            let mut out = services_table(&value);
            if let Some(r) = replicas {
                out.push_str(&replicas_table(&r));
            }
            out
        }
        CtlCommand::State { .. } => import_table(&value),
        CtlCommand::History { .. } => history_table(&value),
        CtlCommand::Mirror {
            to: None,
            off: false,
            ..
        } => mirror_table(&value),
        CtlCommand::Rules { set: None, .. } => rules_table(&value),
        CtlCommand::Rules { set: Some(_), .. } => {
            format!("{}{}", service_table(&value), rules_table(&value))
        }
        CtlCommand::Reload => format!(
            "reloaded\n{}",
            services_table(value.get("services").unwrap_or(&Value::Null))
        ),
        _ => service_table(&value),
    })
}

/// `ctl rollout …`.
async fn rollout(
    admin: &Admin,
    args: &CtlArgs,
    command: &RolloutCommand,
) -> Result<String, Failure> {
    let path = |s: &str, rest: &str| format!("/api/v1/services/{}/{rest}", segment(s));
    let with_reason = |mut body: Value| {
        if let (Some(r), Some(m)) = (&args.reason, body.as_object_mut()) {
            m.insert("reason".into(), Value::from(r.clone()));
        }
        body
    };
    let (method, p, body) = match command {
        RolloutCommand::Start {
            service,
            plan,
            plan_file,
        } => {
            let plan = match (plan, plan_file) {
                (Some(name), _) => Value::from(name.clone()),
                (None, Some(file)) => {
                    let text = std::fs::read_to_string(file).map_err(|e| {
                        Failure::Usage(format!("--plan-file {}: {e}", file.display()))
                    })?;
                    serde_json::from_str(&text).map_err(|e| {
                        Failure::Usage(format!("--plan-file {}: invalid JSON: {e}", file.display()))
                    })?
                }
                (None, None) => {
                    return Err(Failure::Usage("--plan NAME or --plan-file FILE".into()))
                }
            };
            (
                Method::POST,
                path(service, "rollout"),
                Some(with_reason(json!({ "plan": plan }))),
            )
        }
        RolloutCommand::Status {
            service,
            wait: true,
            timeout,
        } => return rollout_wait(admin, args.json, service, *timeout).await,
        RolloutCommand::Status { service, .. } => (Method::GET, path(service, "rollout"), None),
        RolloutCommand::Pause { service } => (
            Method::POST,
            path(service, "rollout/pause"),
            Some(with_reason(json!({}))),
        ),
        RolloutCommand::Resume { service } => (
            Method::POST,
            path(service, "rollout/resume"),
            Some(with_reason(json!({}))),
        ),
        RolloutCommand::Promote { service, full } => (
            Method::POST,
            path(service, "rollout/promote"),
            Some(with_reason(json!({ "full": full }))),
        ),
        RolloutCommand::Abort { service } => (
            Method::POST,
            path(service, "rollout/abort"),
            Some(with_reason(json!({}))),
        ),
        RolloutCommand::History { service } => (Method::GET, path(service, "rollouts"), None),
    };
    let value = admin.call(method, &p, body, args.if_generation).await?;
    if args.json {
        return Ok(format!("{}\n", pretty(&value)));
    }
    Ok(match command {
        RolloutCommand::History { .. } => value
            .as_array()
            .map(|list| list.iter().map(rollout_line).collect::<String>())
            .unwrap_or_default(),
        _ => rollout_table(&value),
    })
}

/// `rollout status --wait`: long-polls (in calls shorter than the call
/// timeout) until the rollout ends or `timeout` passes.
async fn rollout_wait(
    admin: &Admin,
    json: bool,
    service: &str,
    timeout: Duration,
) -> Result<String, Failure> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let chunk = left.min(CALL_TIMEOUT.saturating_sub(Duration::from_secs(2)));
        let p = format!(
            "/api/v1/services/{}/rollout?wait=done&timeout={}ms",
            segment(service),
            chunk.as_millis()
        );
        let value = admin.call(Method::GET, &p, None, None).await?;
        let state = value["state"].as_str().unwrap_or("");
        let output = if json {
            format!("{}\n", pretty(&value))
        } else {
            rollout_table(&value)
        };
        match state {
            "succeeded" => return Ok(output),
            "rolled_back" | "aborted" => return Err(Failure::Rollout { code: 4, output }),
            _ if Instant::now() >= deadline => return Err(Failure::Rollout { code: 5, output }),
            _ => {}
        }
    }
}

/// One line per rollout.
fn rollout_line(r: &Value) -> String {
    format!(
        "{}  {}  {} → {}  started {}  {}\n",
        r["id"].as_str().unwrap_or("?"),
        r["state"].as_str().unwrap_or("?"),
        r["baseline"].as_str().unwrap_or("?"),
        r["canary"].as_str().unwrap_or("?"),
        r["started_at"].as_str().unwrap_or("?"),
        r["reason"].as_str().unwrap_or(""),
    )
}

/// The rollout object as text.
fn rollout_table(r: &Value) -> String {
    let mut out = rollout_line(r);
    let step = r["step"].as_u64().unwrap_or(0);
    let steps = r["steps"].as_array().map_or(0, Vec::len);
    let _ = writeln!(
        out,
        "  step {}/{}  weights blue {} green {}  left {}",
        step,
        steps,
        r["weights"]["blue"],
        r["weights"]["green"],
        r["step_remaining_s"]
            .as_f64()
            .map_or_else(|| "-".to_string(), |s| format!("{s:.0}s"))
    );
    for rule in r["analysis"]["rules"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        let _ = writeln!(
            out,
            "  {:<12} {:<8} canary {}  baseline {}",
            rule["name"].as_str().unwrap_or("?"),
            rule["verdict"].as_str().unwrap_or("?"),
            rule["canary"],
            rule["baseline"]
        );
    }
    let _ = writeln!(
        out,
        "  impact: {} canary requests, {} failures, {} user failures",
        r["impact"]["canary_requests"],
        r["impact"]["canary_failures"],
        r["impact"]["user_failures"]
    );
    out
}

/// Polls the service until every backend of `color` is healthy.
async fn wait_healthy(
    admin: &Admin,
    json: bool,
    service: &str,
    color: &str,
    timeout: Duration,
    interval: Duration,
) -> Result<String, Failure> {
    if color != "blue" && color != "green" {
        return Err(Failure::Usage(format!(
            "color `{color}`: expected blue or green"
        )));
    }
    let path = format!("/api/v1/services/{}", segment(service));
    let deadline = Instant::now() + timeout;
    let interval = interval.max(Duration::from_millis(10));
    loop {
        let value = admin.call(Method::GET, &path, None, None).await?;
        let backends = value
            .pointer(&format!("/pools/{color}/backends"))
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let waiting: Vec<String> = backends
            .iter()
            .filter(|b| b["healthy"] != Value::Bool(true))
            .map(|b| {
                format!(
                    "{} ({})",
                    b["addr"].as_str().unwrap_or("?"),
                    b["state"].as_str().unwrap_or("not healthy")
                )
            })
            .collect();
        if !backends.is_empty() && waiting.is_empty() {
            return Ok(if json {
                format!("{}\n", pretty(&value))
            } else {
                format!(
                    "{service} {color}: all {} backend(s) healthy\n{}",
                    backends.len(),
                    service_table(&value)
                )
            });
        }
        let now = Instant::now();
        if now >= deadline {
            let what = if backends.is_empty() {
                "the pool has no backends".to_string()
            } else {
                format!("not healthy: {}", waiting.join(", "))
            };
            return Err(Failure::TimedOut(format!(
                "{service} {color}: timed out after {} waiting for healthy backends; {what}",
                humantime::format_duration(timeout)
            )));
        }
        tokio::time::sleep(interval.min(deadline - now)).await;
    }
}

/// `status --watch`: prints the state on connect and on every change,
/// from `/api/v1/events`; on a lost stream, says so on stderr and
/// reconnects every 2 s. Returns only on a refusal (bad token, unknown
/// service) or an unusable answer.
async fn watch(admin: &Admin, json: bool, service: Option<&str>) -> Result<String, Failure> {
    use std::io::Write as _;
    if let Some(s) = service {
        // An unknown service is refused at once, not watched forever.
        admin
            .call(
                Method::GET,
                &format!("/api/v1/services/{}", segment(s)),
                None,
                None,
            )
            .await?;
    }
    let mut rates: Option<Value> = None;
    loop {
        let mut body = match admin.events().await {
            Ok(b) => b,
            Err(f @ (Failure::Refused { .. } | Failure::Usage(_) | Failure::Rollout { .. })) => {
                return Err(f)
            }
            Err(Failure::Unreachable(m) | Failure::TimedOut(m)) => {
                eprintln!("switchyard ctl: {m}; retrying in 2s");
                tokio::time::sleep(Duration::from_secs(2)).await;
                continue;
            }
        };
        let mut buf: Vec<u8> = Vec::new();
        let lost = loop {
            // Heartbeats come every 15 s; 40 s of silence is a dead stream.
            let frame = match tokio::time::timeout(Duration::from_secs(40), body.frame()).await {
                Ok(Some(Ok(f))) => f,
                Ok(Some(Err(e))) => break e.to_string(),
                Ok(None) => break "the server ended the stream".to_string(),
                Err(_) => break "no heartbeat for 40s".to_string(),
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            buf.extend_from_slice(&data);
            while let Some(i) = buf.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = buf.drain(..i + 2).collect();
                let Some((event, value)) = sse_event(&block) else {
                    continue;
                };
                match event.as_str() {
                    "stats" => rates = Some(value),
                    "state" => {
                        let out = watch_output(&value, rates.as_ref(), json, service);
                        let mut stdout = std::io::stdout().lock();
                        let _ = stdout.write_all(out.as_bytes());
                        let _ = stdout.flush();
                    }
                    _ => {}
                }
            }
        };
        eprintln!("switchyard ctl: event stream lost ({lost}); reconnecting in 2s");
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// `(event, data as JSON)` of one SSE block.
fn sse_event(block: &[u8]) -> Option<(String, Value)> {
    let text = std::str::from_utf8(block).ok()?;
    let mut event = "message".to_string();
    let mut data = String::new();
    for line in text.lines() {
        if let Some(e) = line.strip_prefix("event:") {
            event = e.trim().to_string();
        } else if let Some(d) = line.strip_prefix("data:") {
            data.push_str(d.strip_prefix(' ').unwrap_or(d));
        }
    }
    let value = serde_json::from_str(&data).ok()?;
    Some((event, value))
}

/// What `status --watch` prints for one `state` event.
fn watch_output(state: &Value, rates: Option<&Value>, json: bool, service: Option<&str>) -> String {
    let services: Vec<&Value> = state
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|s| service.is_none_or(|n| s["name"] == n))
                .collect()
        })
        .unwrap_or_default();
    if json {
        let list = Value::from(services.into_iter().cloned().collect::<Vec<_>>());
        return format!("{list}\n");
    }
    let mut out = format!(
        "--- {} ---\n",
        humantime::format_rfc3339_seconds(std::time::SystemTime::now())
    );
    for s in services {
        out.push_str(&service_table(s));
        let stats = rates
            .and_then(|r| r["services"].as_array())
            .and_then(|a| a.iter().find(|x| x["name"] == s["name"]));
        if let Some(st) = stats {
            let ratio = |v: &Value| match v.as_f64() {
                Some(r) => format!("{:.2}%", r * 100.0),
                None => "-".to_string(),
            };
            let _ = writeln!(
                out,
                "  rates (this replica, 10s): blue {:.1} req/s {} 5xx, green {:.1} req/s {} 5xx",
                st["pools"]["blue"]["rps_10s"].as_f64().unwrap_or(0.0),
                ratio(&st["pools"]["blue"]["error_ratio_10s"]),
                st["pools"]["green"]["rps_10s"].as_f64().unwrap_or(0.0),
                ratio(&st["pools"]["green"]["error_ratio_10s"]),
            );
        }
    }
    out
}

/// Where and how to reach the admin API.
struct Admin {
    /// `host:port` to connect to, also the `Host` header.
    authority: String,
    /// Path prefix before `/api/v1` (empty, or `/something` without a
    /// trailing slash).
    prefix: String,
    /// The URL as given, for messages.
    url: String,
    token: Option<String>,
}

impl Admin {
    fn new(args: &CtlArgs, config: Option<&std::path::Path>) -> Result<Admin, Failure> {
        let from_config = match config {
            Some(path) => Some(
                crate::config::load(path).map_err(|e| Failure::Usage(format!("--config: {e}")))?,
            ),
            None => None,
        };
        let url = match (&args.admin, &from_config) {
            (Some(url), _) => url.trim().to_string(),
            (None, Some(c)) => {
                // A wildcard listen address is reached on loopback.
                let mut addr = c.admin.listen;
                if addr.ip().is_unspecified() {
                    addr.set_ip(match addr {
                        std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                        std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
                    });
                }
                format!("http://{addr}")
            }
            (None, None) => "http://127.0.0.1:9901".to_string(),
        };
        let rest = if let Some(rest) = url.strip_prefix("http://") {
            rest
        } else if url.starts_with("https://") {
            return Err(Failure::Usage(format!(
                "--admin {url}: the admin API speaks plain HTTP; give http://HOST:PORT \
                 (put a TLS-terminating proxy in front to expose it)"
            )));
        } else if url.contains("://") {
            return Err(Failure::Usage(format!(
                "--admin {url}: expected http://HOST:PORT"
            )));
        } else {
            &url
        };
        let (authority, prefix) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        if authority.is_empty() || authority.contains('@') {
            return Err(Failure::Usage(format!(
                "--admin {url}: expected http://HOST:PORT"
            )));
        }
        let authority = if has_port(authority) {
            authority.to_string()
        } else {
            format!("{authority}:80")
        };
        let env_token = std::env::var("SWITCHYARD_TOKEN")
            .ok()
            .filter(|t| !t.trim().is_empty());
        let config_token_file = from_config.and_then(|c| c.admin.token_file);
        let token = match (&args.token_file, env_token, config_token_file) {
            (Some(f), _, _) => Some(read_token(f).map_err(Failure::Usage)?),
            (None, Some(t), _) => Some(token_of_line(t.trim()).to_string()),
            (None, None, Some(f)) => Some(read_token(&f).map_err(Failure::Usage)?),
            (None, None, None) => None,
        };
        Ok(Admin {
            authority,
            prefix: prefix.to_string(),
            url,
            token,
        })
    }

    /// One admin API call: the JSON body of a 2xx answer, or why not.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        if_generation: Option<u64>,
    ) -> Result<Value, Failure> {
        let exchange = self.exchange(method, path, body, if_generation);
        let (status, bytes) = match tokio::time::timeout(CALL_TIMEOUT, exchange).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(Failure::Unreachable(format!(
                    "the admin API at {} did not answer within {}s",
                    self.url,
                    CALL_TIMEOUT.as_secs()
                )))
            }
        };
        let value: Option<Value> = serde_json::from_slice(&bytes).ok();
        if status.is_success() {
            return value.ok_or_else(|| {
                Failure::Unreachable(format!(
                    "{}: answer to {path} is not JSON; is this switchyard's admin listener?",
                    self.url
                ))
            });
        }
        let body = value.unwrap_or_else(|| Value::from(String::from_utf8_lossy(&bytes)));
        let message = match (
            body.pointer("/error/code").and_then(Value::as_str),
            body.pointer("/error/message").and_then(Value::as_str),
        ) {
            (Some(code), Some(msg)) => format!("{} {code}: {msg}", status.as_u16()),
            _ => format!("{}: {}", status, body.as_str().unwrap_or_default().trim()),
        };
        Err(Failure::Refused { message, body })
    }

    /// One HTTP/1.1 connection to the admin API, driven by its own task.
    async fn connect(
        &self,
    ) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, Failure> {
        let unreachable = |e: &dyn std::fmt::Display| {
            Failure::Unreachable(format!("cannot reach the admin API at {}: {e}", self.url))
        };
        let stream = tokio::net::TcpStream::connect(&self.authority)
            .await
            .map_err(|e| unreachable(&e))?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| unreachable(&e))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    /// Opens `/api/v1/events`: the streaming body of a 200, or why not.
    async fn events(&self) -> Result<hyper::body::Incoming, Failure> {
        let unreachable = |e: &dyn std::fmt::Display| {
            Failure::Unreachable(format!("cannot reach the admin API at {}: {e}", self.url))
        };
        let open = async {
            let mut sender = self.connect().await?;
            let mut req = Request::builder()
                .uri(format!("{}/api/v1/events", self.prefix))
                .header(http::header::HOST, &self.authority)
                .header(http::header::ACCEPT, "text/event-stream");
            if let Some(t) = &self.token {
                req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
            }
            let req = req
                .body(Full::new(Bytes::new()))
                .map_err(|e| Failure::Usage(format!("cannot build the request: {e}")))?;
            sender.send_request(req).await.map_err(|e| unreachable(&e))
        };
        let resp = match tokio::time::timeout(CALL_TIMEOUT, open).await {
            Ok(r) => r?,
            Err(_) => return Err(unreachable(&"no answer within 10s")),
        };
        let status = resp.status();
        if status.is_success() {
            return Ok(resp.into_body());
        }
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        let body: Value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::from(String::from_utf8_lossy(&bytes)));
        let message = match body.pointer("/error/message").and_then(Value::as_str) {
            Some(m) => format!("{} {}", status.as_u16(), m),
            None => format!("{status} from /api/v1/events"),
        };
        if status.is_server_error() {
            return Err(Failure::Unreachable(message));
        }
        Err(Failure::Refused { message, body })
    }

    async fn exchange(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        if_generation: Option<u64>,
    ) -> Result<(StatusCode, Bytes), Failure> {
        let unreachable = |e: &dyn std::fmt::Display| {
            Failure::Unreachable(format!("cannot reach the admin API at {}: {e}", self.url))
        };
        let mut sender = self.connect().await?;
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.prefix))
            .header(http::header::HOST, &self.authority)
            .header(http::header::ACCEPT, "application/json")
            .header(
                http::header::USER_AGENT,
                concat!("switchyard-ctl/", env!("CARGO_PKG_VERSION")),
            );
        if body.is_some() {
            req = req.header(http::header::CONTENT_TYPE, "application/json");
        }
        if let Some(t) = &self.token {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        if let Some(g) = if_generation {
            req = req.header(http::header::IF_MATCH, format!("\"{g}\""));
        }
        let bytes = body.map(|b| b.to_string()).unwrap_or_default();
        let req = req
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|e| Failure::Usage(format!("cannot build the request: {e}")))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| unreachable(&e))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| unreachable(&e))?
            .to_bytes();
        Ok((status, body))
    }
}

/// Does `host:port` (or `[v6]:port`) carry a port?
fn has_port(authority: &str) -> bool {
    match authority.rsplit_once(':') {
        Some((host, port)) => {
            !port.is_empty()
                && port.bytes().all(|b| b.is_ascii_digit())
                && (!host.contains(':') || host.ends_with(']'))
        }
        None => false,
    }
}

/// Percent-encodes what cannot stand in a path segment, so a name from the
/// command line can never change which endpoint is called.
fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn read_token(path: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("--token-file {}: {e}", path.display()))?;
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .ok_or_else(|| format!("--token-file {}: no token in the file", path.display()))?;
    Ok(token_of_line(line).to_string())
}

/// The secret of a token line: `NAME:SECRET` or a bare `SECRET`, as the
/// server's `token_file` reads it.
fn token_of_line(line: &str) -> &str {
    match line.split_once(':') {
        Some((_, secret)) => secret.trim(),
        None => line,
    }
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

fn pct(v: &Value) -> String {
    v.as_f64()
        .map(|f| format!("{f}%"))
        .unwrap_or_else(|| "?".into())
}

fn text<'a>(v: &'a Value, fallback: &'a str) -> &'a str {
    v.as_str().unwrap_or(fallback)
}

/// Left-aligned columns, two spaces apart; each row indented by `indent`.
fn columns(rows: &[Vec<String>], indent: &str) -> String {
    let width = |i: usize| {
        rows.iter()
            .map(|r| r.get(i).map_or(0, |c| c.chars().count()))
            .max()
    };
    let n = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..n).map(|i| width(i).unwrap_or(0)).collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::from(indent);
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}  ", w = widths[i]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// One service: a summary line, then its pools and backends.
fn service_table(s: &Value) -> String {
    let mut out = format!(
        "{}  live={}  blue {} / green {}  generation {}\n",
        text(&s["name"], "?"),
        text(&s["live"], "?"),
        pct(&s["weights"]["blue"]),
        pct(&s["weights"]["green"]),
        s["generation"]
    );
    let mut rows = vec![vec![
        "POOL".to_string(),
        "WEIGHT".into(),
        "BACKEND".into(),
        "STATE".into(),
        "IN-FLIGHT".into(),
    ]];
    for color in ["blue", "green"] {
        let weight = pct(&s["weights"][color]);
        let backends = s["pools"][color]["backends"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        if backends.is_empty() {
            rows.push(vec![
                color.to_string(),
                weight,
                "(no backends)".into(),
                String::new(),
                String::new(),
            ]);
            continue;
        }
        for (i, b) in backends.iter().enumerate() {
            let state = match (b["state"].as_str(), b["healthy"].as_bool()) {
                (Some(state), _) => state,
                (None, Some(true)) => "healthy",
                (None, _) => "unhealthy",
            };
            rows.push(vec![
                if i == 0 {
                    color.to_string()
                } else {
                    String::new()
                },
                if i == 0 {
                    weight.clone()
                } else {
                    String::new()
                },
                text(&b["addr"], "?").to_string(),
                state.to_string(),
                b["in_flight"]
                    .as_u64()
                    .map_or(String::new(), |n| n.to_string()),
            ]);
        }
    }
    out.push_str(&columns(&rows, "  "));
    if s["mirror"].is_object() {
        out.push_str(&mirror_line(&s["mirror"]));
    }
    out
}

/// `  mirror: 10% to green (GET,HEAD,OPTIONS; body ≤ 65536 B, ≤ 64 in flight, timeout 5s)`.
fn mirror_line(m: &Value) -> String {
    let methods: Vec<&str> = m["methods"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    format!(
        "  mirror: {}% to {} ({}; body ≤ {} B, ≤ {} in flight, timeout {})\n",
        m["percent"],
        text(&m["to"], "?"),
        methods.join(","),
        m["max_body_bytes"],
        m["max_inflight"],
        text(&m["timeout"], "?"),
    )
}

/// `GET …/mirror`: the mirror and this replica's counters.
fn mirror_table(v: &Value) -> String {
    let c = &v["counters"];
    let mut out = if v["mirror"].is_object() {
        mirror_line(&v["mirror"])
    } else {
        "  mirror: off\n".to_string()
    };
    let dropped: Vec<String> = c["dropped"]
        .as_object()
        .map(|m| m.iter().map(|(k, n)| format!("{k}={n}")).collect())
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "  sent {}  in flight {}  mismatches {}  dropped {}",
        c["sent"],
        c["in_flight"],
        c["mismatches"],
        dropped.join(" ")
    );
    for color in ["blue", "green"] {
        let p = &c["pools"][color];
        if p["requests"].as_u64().unwrap_or(0) > 0 {
            let _ = writeln!(
                out,
                "  copies to {color}: {} answered, {} failed",
                p["requests"], p["failures"]
            );
        }
    }
    out
}

/// `ctl status` in fleet mode: one line per replica and service.
fn replicas_table(v: &Value) -> String {
    let mut rows = vec![vec![
        "REPLICA".to_string(),
        "STATE".to_string(),
        "SERVICE".to_string(),
        "GENERATION".to_string(),
        "ADMIN".to_string(),
    ]];
    for r in v["replicas"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        let services = r["services"].as_object().cloned().unwrap_or_default();
        for (name, s) in &services {
            rows.push(vec![
                text(&r["id"], "?").to_string(),
                text(&s["state"], "?").to_uppercase(),
                name.clone(),
                s["generation"]
                    .as_u64()
                    .map_or_else(|| "-".to_string(), |g| g.to_string()),
                text(&r["admin"], "").to_string(),
            ]);
        }
    }
    format!(
        "\nreplicas (this one: {}):\n{}",
        text(&v["replica"], "?"),
        columns(&rows, "  ")
    )
}

/// `ctl state import`: what was written and what etcd already had.
fn import_table(v: &Value) -> String {
    let mut out = String::new();
    for (key, what) in [
        ("imported", "imported"),
        (
            "already_in_etcd",
            "left alone (etcd has it at the same or a newer generation)",
        ),
    ] {
        for s in v[key].as_array().map(Vec::as_slice).unwrap_or_default() {
            out.push_str(&format!(
                "{} generation {}: {what}\n",
                text(&s["service"], "?"),
                s["generation"]
            ));
        }
    }
    out
}

/// Every service, one block each.
fn services_table(v: &Value) -> String {
    let services = v.as_array().map(Vec::as_slice).unwrap_or_default();
    if services.is_empty() {
        return "no services\n".into();
    }
    services
        .iter()
        .map(service_table)
        .collect::<Vec<_>>()
        .join("\n")
}

/// `{"rules":[…]}` from a file holding that object or a bare list.
fn read_rules_file(path: &std::path::Path) -> Result<Value, Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::Usage(format!("--set {}: {e}", path.display())))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| Failure::Usage(format!("--set {}: invalid JSON: {e}", path.display())))?;
    match v {
        Value::Array(_) => Ok(json!({ "rules": v })),
        Value::Object(ref m) if m.contains_key("rules") => {
            Ok(json!({ "rules": m.get("rules").cloned().unwrap_or(Value::Null) }))
        }
        _ => Err(Failure::Usage(format!(
            "--set {}: expected {{\"rules\":[...]}} or a JSON list of rules",
            path.display()
        ))),
    }
}

/// The rules of a service (the `rules` list of a rules answer or a
/// service object), one per line in order.
fn rules_table(v: &Value) -> String {
    let list = v["rules"].as_array().map(Vec::as_slice).unwrap_or_default();
    if list.is_empty() {
        return "no rules (traffic follows the weights)\n".into();
    }
    let mut rows = vec![vec![
        "#".to_string(),
        "RULE".into(),
        "TO".into(),
        "FALLBACK".into(),
        "MATCH (all of)".into(),
    ]];
    for (i, r) in list.iter().enumerate() {
        let conds: Vec<&str> = r["match"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        rows.push(vec![
            (i + 1).to_string(),
            text(&r["name"], "?").to_string(),
            text(&r["to"], "?").to_string(),
            if r["fallback"].as_bool() == Some(true) {
                "weights".into()
            } else {
                "503".into()
            },
            conds.join("  "),
        ]);
    }
    columns(&rows, "")
}

fn history_table(v: &Value) -> String {
    let mut rows = vec![vec![
        "GEN".to_string(),
        "AT".into(),
        "ACTION".into(),
        "FROM".into(),
        "TO".into(),
        "ACTOR".into(),
        "REASON".into(),
    ]];
    let weights = |x: &Value| {
        format!(
            "{}/{}",
            x["blue"].as_f64().map_or("?".into(), |f| f.to_string()),
            x["green"].as_f64().map_or("?".into(), |f| f.to_string())
        )
    };
    for e in v.as_array().map(Vec::as_slice).unwrap_or_default() {
        rows.push(vec![
            e["generation"].to_string(),
            text(&e["at"], "?").to_string(),
            text(&e["action"], "?").to_string(),
            weights(&e["from"]),
            weights(&e["to"]),
            text(&e["actor"], "").to_string(),
            text(&e["reason"], "").to_string(),
        ]);
    }
    columns(&rows, "")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_and_segments() {
        assert!(has_port("127.0.0.1:9901"));
        assert!(has_port("[::1]:9901"));
        assert!(!has_port("[::1]"));
        assert!(!has_port("admin.internal"));
        assert_eq!(segment("web"), "web");
        assert_eq!(segment("a/../b c"), "a%2F..%2Fb%20c");
    }

    #[test]
    fn table_shows_pools_backends_and_health() {
        let s = json!({
            "name": "web", "live": "split", "generation": 7,
            "weights": {"blue": 90, "green": 10},
            "pools": {
                "blue": {"backends": [
                    {"addr": "10.0.0.1:80", "healthy": true, "state": "healthy", "in_flight": 2},
                    {"addr": "10.0.0.2:80", "healthy": false, "state": "unhealthy", "in_flight": 0}
                ]},
                "green": {"backends": []}
            }
        });
        let t = service_table(&s);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines[0],
            "web  live=split  blue 90% / green 10%  generation 7"
        );
        assert_eq!(
            lines[1],
            "  POOL   WEIGHT  BACKEND        STATE      IN-FLIGHT"
        );
        assert_eq!(lines[2], "  blue   90%     10.0.0.1:80    healthy    2");
        assert_eq!(lines[3], "                 10.0.0.2:80    unhealthy  0");
        assert_eq!(lines[4], "  green  10%     (no backends)");
    }

    #[test]
    fn token_lines() {
        assert_eq!(token_of_line("ci:s3cret-token"), "s3cret-token");
        assert_eq!(token_of_line("s3cret-token"), "s3cret-token");
    }
}
