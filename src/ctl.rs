//! `switchyard ctl`: the admin API client for pipelines (SPEC §1).
//!
//! Exit status: 0 when the server accepted the call, 1 when it refused (the
//! server's error is printed) or could not be reached, 2 for usage errors
//! (from clap).

use std::path::PathBuf;

use bytes::Bytes;
use clap::{Args, Subcommand};
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

/// `switchyard ctl` options.
#[derive(Debug, Args)]
pub struct CtlArgs {
    /// Admin API base URL.
    #[arg(
        long,
        default_value = "http://127.0.0.1:9901",
        env = "SWITCHYARD_ADMIN"
    )]
    pub admin: String,
    /// File holding the bearer token (`NAME:SECRET` or `SECRET`; first line used).
    #[arg(long, env = "SWITCHYARD_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Print the server's JSON instead of a summary.
    #[arg(long)]
    pub json: bool,
    /// Only apply if the service is at this generation (If-Match).
    #[arg(long, global = true)]
    pub if_match: Option<u64>,
    /// Reason recorded in history.
    #[arg(long, global = true)]
    pub reason: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// `switchyard ctl` subcommands.
#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// Show one service, or all.
    Status {
        /// Service name.
        service: Option<String>,
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
        #[arg(long)]
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
        #[arg(long)]
        to_generation: Option<u64>,
    },
    /// Replace the backends of a pool.
    SetPool {
        /// Service name.
        service: String,
        /// `blue` or `green`.
        color: String,
        /// `host:port` (or `https://host:port`), one or more.
        #[arg(required = true)]
        backends: Vec<String>,
        /// Even if the pool takes traffic.
        #[arg(long)]
        force: bool,
    },
    /// Routing history of a service, newest first.
    History {
        /// Service name.
        service: String,
    },
    /// Re-read the config file.
    Reload,
}

/// Runs a ctl command; returns the process exit status.
pub async fn run(args: CtlArgs) -> i32 {
    match run_inner(&args).await {
        Ok(out) => {
            print!("{out}");
            0
        }
        Err(msg) => {
            eprintln!("switchyard ctl: {msg}");
            1
        }
    }
}

async fn run_inner(args: &CtlArgs) -> Result<String, String> {
    let token = match &args.token_file {
        Some(f) => Some(read_token(f)?),
        None => None,
    };
    let reason = |mut body: Value| {
        if let (Some(r), Some(m)) = (&args.reason, body.as_object_mut()) {
            m.insert("reason".into(), Value::from(r.clone()));
        }
        body
    };
    let (method, path, body) = match &args.command {
        CtlCommand::Status { service: None } => (Method::GET, "/api/v1/services".to_string(), None),
        CtlCommand::Status { service: Some(s) } => {
            (Method::GET, format!("/api/v1/services/{s}"), None)
        }
        CtlCommand::Switch {
            service,
            color,
            force,
        } => (
            Method::POST,
            format!("/api/v1/services/{service}/switch"),
            Some(reason(json!({ "to": color, "force": force }))),
        ),
        CtlCommand::Split {
            service,
            green,
            force,
        } => (
            Method::POST,
            format!("/api/v1/services/{service}/split"),
            Some(reason(json!({ "green": green, "force": force }))),
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
                format!("/api/v1/services/{service}/rollback"),
                Some(reason(body)),
            )
        }
        CtlCommand::SetPool {
            service,
            color,
            backends,
            force,
        } => (
            Method::PUT,
            format!("/api/v1/services/{service}/pools/{color}"),
            Some(reason(json!({ "backends": backends, "force": force }))),
        ),
        CtlCommand::History { service } => (
            Method::GET,
            format!("/api/v1/services/{service}/history"),
            None,
        ),
        CtlCommand::Reload => (Method::POST, "/api/v1/reload".to_string(), None),
    };
    let (status, value) = call(
        &args.admin,
        method,
        &path,
        body,
        token.as_deref(),
        args.if_match,
    )
    .await?;
    if !status.is_success() {
        let msg = value
            .pointer("/error/message")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| value.to_string());
        let code = value
            .pointer("/error/code")
            .and_then(Value::as_str)
            .unwrap_or("error");
        return Err(format!("{} {code}: {msg}", status.as_u16()));
    }
    if args.json {
        return Ok(format!(
            "{}\n",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        ));
    }
    Ok(match &args.command {
        CtlCommand::Status { service: None } => value
            .as_array()
            .map(|a| a.iter().map(summary).collect::<String>())
            .unwrap_or_default(),
        CtlCommand::History { .. } => history(&value),
        CtlCommand::Reload => format!(
            "reloaded\n{}",
            value
                .get("services")
                .and_then(Value::as_array)
                .map(|a| a.iter().map(summary).collect::<String>())
                .unwrap_or_default()
        ),
        _ => summary(&value),
    })
}

fn read_token(path: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .ok_or_else(|| format!("{}: no token", path.display()))?;
    Ok(match line.split_once(':') {
        Some((_, secret)) => secret.trim().to_string(),
        None => line.to_string(),
    })
}

fn pct(v: &Value) -> String {
    v.as_f64()
        .map(|f| format!("{f}"))
        .unwrap_or_else(|| "?".into())
}

fn summary(s: &Value) -> String {
    let mut out = format!(
        "{}  live={}  blue {}% / green {}%  generation {}\n",
        s["name"].as_str().unwrap_or("?"),
        s["live"].as_str().unwrap_or("?"),
        pct(&s["weights"]["blue"]),
        pct(&s["weights"]["green"]),
        s["generation"]
    );
    for color in ["blue", "green"] {
        let backends = s["pools"][color]["backends"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let list: Vec<String> = backends
            .iter()
            .map(|b| {
                format!(
                    "{} ({})",
                    b["addr"].as_str().unwrap_or("?"),
                    b["state"].as_str().unwrap_or("?")
                )
            })
            .collect();
        out.push_str(&format!("  {color:<5} {}\n", list.join(", ")));
    }
    out
}

fn history(v: &Value) -> String {
    let mut out = String::new();
    for e in v.as_array().cloned().unwrap_or_default() {
        let w = |x: &Value| format!("{}/{}", pct(&x["blue"]), pct(&x["green"]));
        out.push_str(&format!(
            "{:>5}  {}  {:<8}  {} -> {}  actor={}{}\n",
            e["generation"],
            e["at"].as_str().unwrap_or("?"),
            e["action"].as_str().unwrap_or("?"),
            w(&e["from"]),
            w(&e["to"]),
            e["actor"].as_str().unwrap_or("?"),
            e["reason"]
                .as_str()
                .map(|r| format!("  reason={r}"))
                .unwrap_or_default(),
        ));
    }
    out
}

/// One admin API call; returns status and JSON body.
async fn call(
    base: &str,
    method: Method,
    path: &str,
    body: Option<Value>,
    token: Option<&str>,
    if_match: Option<u64>,
) -> Result<(http::StatusCode, Value), String> {
    let authority = base
        .strip_prefix("http://")
        .ok_or_else(|| format!("--admin {base}: expected http://host:port"))?
        .trim_end_matches('/');
    let stream = tokio::net::TcpStream::connect(authority)
        .await
        .map_err(|e| format!("cannot reach the admin API at {base}: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("{base}: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let bytes = body.map(|b| b.to_string()).unwrap_or_default();
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, authority)
        .header(http::header::CONTENT_TYPE, "application/json");
    if let Some(t) = token {
        req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    if let Some(g) = if_match {
        req = req.header(http::header::IF_MATCH, format!("\"{g}\""));
    }
    let req = req
        .body(Full::new(Bytes::from(bytes)))
        .map_err(|e| format!("bad request: {e}"))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("{base}: {e}"))?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("{base}: {e}"))?
        .to_bytes();
    let value = serde_json::from_slice(&body)
        .unwrap_or_else(|_| Value::from(String::from_utf8_lossy(&body).to_string()));
    Ok((status, value))
}
