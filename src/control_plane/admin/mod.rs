//! The admin listener (SPEC §4 and §5): `/healthz`, `/readyz`, `/metrics`,
//! and the JSON API under `/api/v1`, as a small hyper service routed with
//! one `match`.
//!
//! Request bodies are capped at 1 MiB and decoded by hand from JSON values,
//! so that every refusal names the field at fault; unknown fields are
//! refused. Every mutation goes through [`Control::execute`]. Every refusal
//! is an [`AdminError`], whose `status()` and `code()` are the one mapping.

pub(crate) mod auth;
pub(crate) mod events;
mod fleet;
pub(crate) mod guard;
pub(crate) mod stats;
pub(crate) mod ui;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::header::{HeaderValue, ALLOW, AUTHORIZATION, CONTENT_TYPE, IF_MATCH, RETRY_AFTER};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde_json::{json, Map, Value};

use crate::color::Color;
use crate::config::mirror::MirrorSpec;
use crate::config::rules::{check_rules, RuleSpec, MAX_RULES};
use crate::config::BackendAddr;
use crate::control_plane::control::{Control, ControlError, Readiness, ReloadError};
use crate::control_plane::rollout::{self, plan::Plan, RolloutError, Verb};
use crate::control_plane::state::{ChangeMeta, Command, CommandError};
use crate::control_plane::store::StoreError;
use crate::metrics::Metrics;
use crate::weights::Weights;
use serde::Deserialize;

/// Largest admin request body.
pub(crate) const MAX_BODY: usize = 1 << 20;

/// Shared by admin connections.
pub(crate) struct Admin {
    control: Arc<Control>,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
}

/// Why the admin API refused a request. The one place where a refusal gets
/// its status and its `code` (SPEC §4): [`AdminError::status`] and
/// [`AdminError::code`], both exhaustive.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AdminError {
    /// A body field is invalid; the message starts with its name.
    #[error("{field}: {message}")]
    InvalidField {
        /// The JSON field at fault.
        field: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// A body field that the endpoint does not know.
    #[error("unknown field `{field}` (expected: {expected})")]
    UnknownField {
        /// The field given.
        field: String,
        /// The fields the endpoint knows.
        expected: &'static str,
    },
    /// The body is not a JSON object.
    #[error("{0}")]
    InvalidJson(String),
    /// The body could not be read.
    #[error("cannot read body: {0}")]
    BadBody(String),
    /// The body is over [`MAX_BODY`].
    #[error("request body larger than {MAX_BODY} bytes")]
    BodyTooLarge,
    /// `If-Match` is not a generation.
    #[error("If-Match: expected a generation like \"7\", got `{0}`")]
    InvalidIfMatch(String),
    /// Missing or wrong bearer token.
    #[error("missing or invalid bearer token (Authorization: Bearer TOKEN)")]
    Unauthorized,
    /// No endpoint at this path.
    #[error("no such path `{0}`")]
    NoSuchPath(String),
    /// No such service.
    #[error("unknown service `{0}`")]
    UnknownService(String),
    /// No such pool color in the path.
    #[error("unknown pool `{0}` (blue or green)")]
    UnknownColor(String),
    /// The path exists, the method does not; carries the `Allow` value.
    #[error("method not allowed here; allowed: {0}")]
    MethodNotAllowed(&'static str),
    /// A fleet-mode call (`/replicas`, `/state/import`) on a replica whose
    /// state is not in etcd.
    #[error("this replica does not keep its state in etcd ([state] backend = \"file\")")]
    NotFleet,
    /// A change refused or not made by the control plane.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// A reload refused; the old config keeps running.
    #[error(transparent)]
    Reload(#[from] ReloadError),
    /// A rollout call refused (SPEC §10).
    #[error(transparent)]
    Rollout(RolloutError),
}

impl From<RolloutError> for AdminError {
    fn from(e: RolloutError) -> AdminError {
        match e {
            RolloutError::Control(c) => AdminError::Control(c),
            other => AdminError::Rollout(other),
        }
    }
}

impl AdminError {
    fn field(field: &'static str, message: impl Into<String>) -> AdminError {
        AdminError::InvalidField {
            field,
            message: message.into(),
        }
    }

    /// The HTTP status of this refusal.
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            AdminError::InvalidField { .. }
            | AdminError::UnknownField { .. }
            | AdminError::InvalidJson(_)
            | AdminError::BadBody(_)
            | AdminError::InvalidIfMatch(_) => StatusCode::BAD_REQUEST,
            AdminError::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            AdminError::Unauthorized => StatusCode::UNAUTHORIZED,
            AdminError::NoSuchPath(_)
            | AdminError::UnknownService(_)
            | AdminError::UnknownColor(_) => StatusCode::NOT_FOUND,
            AdminError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            AdminError::NotFleet => StatusCode::CONFLICT,
            AdminError::Control(ControlError::Command(c)) => match c {
                CommandError::UnknownService(_) => StatusCode::NOT_FOUND,
                CommandError::BadField { .. } | CommandError::BadRule(_) => StatusCode::BAD_REQUEST,
                CommandError::NoHealthyBackend(_)
                | CommandError::PoolTakesTraffic { .. }
                | CommandError::NothingToRollBack
                | CommandError::RolloutActive(_)
                | CommandError::RolloutDrivenElsewhere { .. } => StatusCode::CONFLICT,
                CommandError::StaleGeneration { .. } => StatusCode::PRECONDITION_FAILED,
            },
            AdminError::Control(ControlError::Persist(p))
            | AdminError::Reload(ReloadError::Persist(p)) => store_status(p),
            AdminError::Control(ControlError::Build(_)) => StatusCode::INTERNAL_SERVER_ERROR,
            AdminError::Reload(r) => match r {
                ReloadError::NoFile => StatusCode::CONFLICT,
                ReloadError::Config(_) | ReloadError::Files(_) => StatusCode::BAD_REQUEST,
                ReloadError::Persist(p) => store_status(p),
            },
            AdminError::Rollout(r) => match r {
                RolloutError::UnknownService(_) | RolloutError::NoRollout(_) => {
                    StatusCode::NOT_FOUND
                }
                RolloutError::Active(_)
                | RolloutError::Verb(_)
                | RolloutError::NoHealthyBackend(_)
                | RolloutError::Split(_) => StatusCode::CONFLICT,
                RolloutError::UnknownPlan(_) | RolloutError::BadPlan(_) => StatusCode::BAD_REQUEST,
                RolloutError::Stale { .. } => StatusCode::PRECONDITION_FAILED,
                // `Control` never gets here: `From<RolloutError>` makes it
                // an `AdminError::Control`.
                RolloutError::Control(_) | RolloutError::DriverGone(_) => {
                    StatusCode::INTERNAL_SERVER_ERROR
                }
            },
        }
    }

    /// The machine-readable `error.code`.
    pub(crate) fn code(&self) -> &'static str {
        match self {
            AdminError::InvalidField { .. } => "invalid_field",
            AdminError::UnknownField { .. } => "unknown_field",
            AdminError::InvalidJson(_) => "invalid_json",
            AdminError::BadBody(_) => "bad_body",
            AdminError::BodyTooLarge => "body_too_large",
            AdminError::InvalidIfMatch(_) => "invalid_header",
            AdminError::Unauthorized => "unauthorized",
            AdminError::NoSuchPath(_) => "not_found",
            AdminError::UnknownService(_) => "unknown_service",
            AdminError::UnknownColor(_) => "unknown_color",
            AdminError::MethodNotAllowed(_) => "method_not_allowed",
            AdminError::NotFleet => "not_fleet_mode",
            AdminError::Control(ControlError::Command(c)) => match c {
                CommandError::UnknownService(_) => "unknown_service",
                CommandError::BadField { .. } => "invalid_field",
                CommandError::BadRule(_) => "invalid_rule",
                CommandError::NoHealthyBackend(_) => "no_healthy_backend",
                CommandError::PoolTakesTraffic { .. } => "pool_takes_traffic",
                CommandError::StaleGeneration { .. } => "stale_generation",
                CommandError::NothingToRollBack => "nothing_to_roll_back",
                CommandError::RolloutActive(_) => "rollout_active",
                // Fleet mode: a verb reached a driver whose rollout another
                // replica took over meanwhile (as a verb sent to a replica
                // that does not drive the rollout).
                CommandError::RolloutDrivenElsewhere { .. } => "rollout_state",
            },
            AdminError::Control(ControlError::Build(_)) => "build_failed",
            AdminError::Control(ControlError::Persist(p)) => store_code(p),
            AdminError::Reload(r) => match r {
                ReloadError::NoFile => "no_config_file",
                ReloadError::Config(_) | ReloadError::Files(_) => "invalid_config",
                ReloadError::Persist(p) => store_code(p),
            },
            AdminError::Rollout(r) => match r {
                RolloutError::UnknownService(_) => "unknown_service",
                RolloutError::NoRollout(_) => "no_rollout",
                RolloutError::Active(_) => "rollout_active",
                RolloutError::Verb(_) => "rollout_state",
                RolloutError::NoHealthyBackend(_) => "no_healthy_backend",
                RolloutError::Split(_) => "split_in_effect",
                RolloutError::UnknownPlan(_) => "invalid_field",
                RolloutError::BadPlan(_) => "invalid_plan",
                RolloutError::Stale { .. } => "stale_generation",
                RolloutError::Control(_) => "persist_failed",
                RolloutError::DriverGone(_) => "rollout_driver_stopped",
            },
        }
    }

    /// The body field at fault, if one is.
    fn field_name(&self) -> Option<&'static str> {
        match self {
            AdminError::InvalidField { field, .. }
            | AdminError::Control(ControlError::Command(CommandError::BadField {
                field, ..
            })) => Some(field),
            AdminError::Control(ControlError::Command(CommandError::BadRule(_))) => Some("rules"),
            AdminError::Rollout(RolloutError::UnknownPlan(_) | RolloutError::BadPlan(_)) => {
                Some("plan")
            }
            _ => None,
        }
    }
}

/// Status of a failed write to the state store: etcd unreachable is 503
/// (retry), a conflict that outlived its retries 409, a file 500.
fn store_status(e: &StoreError) -> StatusCode {
    match e {
        StoreError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        StoreError::Conflict { .. } => StatusCode::CONFLICT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn store_code(e: &StoreError) -> &'static str {
    match e {
        StoreError::Unavailable(_) => "state_backend_unavailable",
        StoreError::Conflict { .. } => "write_conflict",
        _ => "persist_failed",
    }
}

type AdminResponse = Response<Full<Bytes>>;

fn json_response(status: StatusCode, value: &impl serde::Serialize) -> AdminResponse {
    let mut body = serde_json::to_vec_pretty(value).unwrap_or_else(|_| b"{}".to_vec());
    body.push(b'\n');
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn error_response(e: &AdminError) -> AdminResponse {
    let mut err = Map::new();
    err.insert("code".into(), Value::from(e.code()));
    err.insert("message".into(), Value::from(e.to_string()));
    if let Some(f) = e.field_name() {
        err.insert("field".into(), Value::from(f));
    }
    let mut resp = json_response(e.status(), &json!({ "error": err }));
    if let AdminError::MethodNotAllowed(allow) = e {
        resp.headers_mut()
            .insert(ALLOW, HeaderValue::from_static(allow));
    }
    if e.status() == StatusCode::SERVICE_UNAVAILABLE {
        resp.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from_static("1"));
    }
    resp
}

fn text_response(status: StatusCode, body: &'static str) -> AdminResponse {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

impl Admin {
    /// The admin service over `control`; `/readyz` answers from `ready`.
    pub(crate) fn new(
        control: Arc<Control>,
        metrics: Arc<Metrics>,
        ready: Arc<AtomicBool>,
    ) -> Admin {
        Admin {
            control,
            metrics,
            ready,
        }
    }

    /// Serves one request. Never fails.
    pub(crate) async fn handle(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Result<AdminResponse, Infallible> {
        let path = req.uri().path().to_string();
        Ok(match self.route(req, &path, peer).await {
            Ok(r) => r,
            Err(e) => error_response(&e),
        })
    }

    async fn route(
        &self,
        req: Request<Incoming>,
        path: &str,
        peer: SocketAddr,
    ) -> Result<AdminResponse, AdminError> {
        let method = req.method().clone();
        match path {
            "/healthz" => return Ok(text_response(StatusCode::OK, "ok\n")),
            "/readyz" => {
                let ready = self.ready.load(Ordering::Relaxed);
                return Ok(match self.control.readiness() {
                    Readiness::Ready if ready => text_response(StatusCode::OK, "ready\n"),
                    Readiness::Ready => {
                        text_response(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                    }
                    r => fleet::readyz(r, ready),
                });
            }
            "/metrics" => {
                let mut resp = Response::new(Full::new(Bytes::from(self.metrics.render())));
                resp.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                return Ok(resp);
            }
            _ => {}
        }
        let Some(api) = path.strip_prefix("/api/v1/") else {
            return Err(AdminError::NoSuchPath(path.to_string()));
        };
        let tokens = self.control.tokens();
        let actor = if tokens.required() {
            let given = req.headers().get(AUTHORIZATION).map(HeaderValue::as_bytes);
            match tokens.check(given) {
                Some(name) => name.to_string(),
                None => return Err(AdminError::Unauthorized),
            }
        } else {
            peer.ip().to_string()
        };
        let segments: Vec<&str> = api.trim_end_matches('/').split('/').collect();
        match (segments.as_slice(), &method) {
            (["replicas"], &Method::GET) => fleet::replicas(&self.control).await,
            (["replicas"], _) => Err(AdminError::MethodNotAllowed("GET")),
            (["state", "import"], &Method::POST) => {
                let body = read_limited(req.into_body(), fleet::MAX_IMPORT_BYTES).await?;
                fleet::import(&self.control, &body).await
            }
            (["state", "import"], _) => Err(AdminError::MethodNotAllowed("POST")),
            (["services"], &Method::GET) => {
                Ok(json_response(StatusCode::OK, &self.control.views()))
            }
            (["services"], _) => Err(AdminError::MethodNotAllowed("GET")),
            (["services", name], &Method::GET) => self
                .control
                .view(name)
                .map(|v| json_response(StatusCode::OK, &v))
                .ok_or_else(|| unknown_service(name)),
            (["services", _], _) => Err(AdminError::MethodNotAllowed("GET")),
            (["services", name, "history"], &Method::GET) => self
                .control
                .history(name)
                .await
                .map(|h| json_response(StatusCode::OK, &h))
                .ok_or_else(|| unknown_service(name)),
            (["services", _, "history"], _) => Err(AdminError::MethodNotAllowed("GET")),
            (["services", name, "rules"], &Method::GET) => self
                .control
                .rules(name)
                .map(|(rules, generation)| {
                    json_response(
                        StatusCode::OK,
                        &json!({ "rules": rules, "generation": generation }),
                    )
                })
                .ok_or_else(|| unknown_service(name)),
            (["services", name, "rules"], &Method::PUT) => {
                let name = name.to_string();
                self.mutate(req, &name, actor, decode_rules).await
            }
            (["services", _, "rules"], _) => Err(AdminError::MethodNotAllowed("GET, PUT")),
            (["services", name, "mirror"], &Method::GET) => self
                .control
                .mirror(name)
                .map(|v| json_response(StatusCode::OK, &v))
                .ok_or_else(|| unknown_service(name)),
            (["services", name, "mirror"], &Method::PUT) => {
                let name = name.to_string();
                self.mutate(req, &name, actor, decode_mirror).await
            }
            (["services", name, "mirror"], &Method::DELETE) => {
                let name = name.to_string();
                self.mutate(req, &name, actor, decode_mirror_off).await
            }
            (["services", _, "mirror"], _) => Err(AdminError::MethodNotAllowed("GET, PUT, DELETE")),
            (["services", name, action @ ("switch" | "split" | "rollback")], &Method::POST) => {
                let name = name.to_string();
                let action = *action;
                self.mutate(req, &name, actor, |body| match action {
                    "switch" => decode_switch(body),
                    "split" => decode_split(body),
                    _ => decode_rollback(body),
                })
                .await
            }
            (["services", _, "switch" | "split" | "rollback"], _) => {
                Err(AdminError::MethodNotAllowed("POST"))
            }
            (["services", name, "pools", color], &Method::PUT) => {
                let color: Color = color
                    .parse()
                    .map_err(|()| AdminError::UnknownColor(color.to_string()))?;
                let name = name.to_string();
                self.mutate(req, &name, actor, |body| decode_pool(body, color))
                    .await
            }
            (["services", _, "pools", _], _) => Err(AdminError::MethodNotAllowed("PUT")),
            (["services", name, "rollout"], &Method::POST) => {
                let name = name.to_string();
                self.start_rollout(req, &name, actor).await
            }
            (["services", name, "rollout"], &Method::GET) => {
                let wait = parse_wait(req.uri().query().unwrap_or(""))?;
                let v = rollout::current(&self.control, name, wait).await?;
                Ok(json_response(StatusCode::OK, &v))
            }
            (["services", _, "rollout"], _) => Err(AdminError::MethodNotAllowed("GET, POST")),
            (
                ["services", name, "rollout", verb @ ("pause" | "resume" | "promote" | "abort")],
                &Method::POST,
            ) => {
                let (name, verb) = (name.to_string(), *verb);
                self.rollout_verb(req, &name, verb, actor).await
            }
            (["services", _, "rollout", "pause" | "resume" | "promote" | "abort"], _) => {
                Err(AdminError::MethodNotAllowed("POST"))
            }
            (["services", name, "rollouts"], &Method::GET) => {
                let v = rollout::history(&self.control, name).await?;
                Ok(json_response(StatusCode::OK, &v))
            }
            (["services", _, "rollouts"], _) => Err(AdminError::MethodNotAllowed("GET")),
            (["reload"], &Method::POST) => {
                self.control.reload().await?;
                Ok(json_response(
                    StatusCode::OK,
                    &json!({ "reloaded": true, "services": self.control.views() }),
                ))
            }
            (["reload"], _) => Err(AdminError::MethodNotAllowed("POST")),
            _ => Err(AdminError::NoSuchPath(path.to_string())),
        }
    }

    /// Reads, decodes and applies a mutation.
    async fn mutate(
        &self,
        req: Request<Incoming>,
        service: &str,
        actor: String,
        decode: impl FnOnce(&Map<String, Value>) -> Result<(Command, Option<String>), AdminError>,
    ) -> Result<AdminResponse, AdminError> {
        if self.control.view(service).is_none() {
            return Err(unknown_service(service));
        }
        let if_match = match req.headers().get(IF_MATCH) {
            None => None,
            Some(v) => parse_if_match(v)?,
        };
        let header_reason = req
            .headers()
            .get("x-change-reason")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = read_json(req.into_body()).await?;
        let (cmd, body_reason) = decode(&body)?;
        let reason = body_reason.or(header_reason);
        if let Some(r) = &reason {
            if r.len() > 1024 {
                return Err(AdminError::field("reason", "longer than 1024 characters"));
            }
        }
        let manual = matches!(
            cmd,
            Command::Switch { .. } | Command::Split { .. } | Command::Rollback { .. }
        );
        let mut aborted = false;
        if manual && get_bool(&body, "force")? {
            // SPEC §10: `force` aborts a running rollout first.
            if rollout::active_id(&self.control, service).await.is_some() {
                let meta = ChangeMeta {
                    actor: actor.clone(),
                    reason: reason.clone(),
                    at: SystemTime::now(),
                    if_match,
                };
                let why = "manual_override".to_string();
                match rollout::verb(&self.control, service, Verb::Abort { why }, meta).await {
                    Ok(_) => aborted = true,
                    Err(RolloutError::Verb(_)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        let meta = ChangeMeta {
            actor,
            reason,
            at: SystemTime::now(),
            // The abort made a generation of its own, after the check.
            if_match: if aborted { None } else { if_match },
        };
        let view = self.control.execute(service, cmd, meta).await?;
        Ok(json_response(StatusCode::OK, &view))
    }
}

impl Admin {
    /// `POST …/rollout`: `{"plan": "NAME" | {steps, analysis}, "reason"?}`.
    async fn start_rollout(
        &self,
        req: Request<Incoming>,
        service: &str,
        actor: String,
    ) -> Result<AdminResponse, AdminError> {
        if self.control.view(service).is_none() {
            return Err(unknown_service(service));
        }
        let (if_match, header_reason) = change_headers(&req)?;
        let body = read_json(req.into_body()).await?;
        only(&body, "plan, reason")?;
        let plan = match body.get("plan") {
            None => {
                return Err(AdminError::field(
                    "plan",
                    "missing (a [[rollout_plan]] name, or a plan object)",
                ))
            }
            Some(Value::String(name)) => self
                .control
                .rollout_plan(name)
                .await
                .ok_or_else(|| RolloutError::UnknownPlan(name.clone()))?,
            Some(v @ Value::Object(_)) => Plan::from_json(v).map_err(RolloutError::BadPlan)?,
            Some(v) => {
                return Err(AdminError::field(
                    "plan",
                    format!("expected a plan name or object, got {v}"),
                ))
            }
        };
        let meta = ChangeMeta {
            actor,
            reason: get_reason(&body)?.or(header_reason),
            at: SystemTime::now(),
            if_match,
        };
        let v = rollout::start(&self.control, service, plan, meta).await?;
        Ok(json_response(StatusCode::CREATED, &v))
    }

    /// `POST …/rollout/{pause,resume,promote,abort}`.
    async fn rollout_verb(
        &self,
        req: Request<Incoming>,
        service: &str,
        verb: &str,
        actor: String,
    ) -> Result<AdminResponse, AdminError> {
        if self.control.view(service).is_none() {
            return Err(unknown_service(service));
        }
        let (if_match, header_reason) = change_headers(&req)?;
        let body = read_json(req.into_body()).await?;
        let verb = match verb {
            "promote" => {
                only(&body, "full, reason")?;
                Verb::Promote {
                    full: get_bool(&body, "full")?,
                }
            }
            "pause" => {
                only(&body, "reason")?;
                Verb::Pause
            }
            "resume" => {
                only(&body, "reason")?;
                Verb::Resume
            }
            _ => {
                only(&body, "reason")?;
                Verb::Abort { why: String::new() }
            }
        };
        let meta = ChangeMeta {
            actor,
            reason: get_reason(&body)?.or(header_reason),
            at: SystemTime::now(),
            if_match,
        };
        let v = rollout::verb(&self.control, service, verb, meta).await?;
        Ok(json_response(StatusCode::OK, &v))
    }
}

/// `If-Match` and `X-Change-Reason` of a mutation.
fn change_headers(req: &Request<Incoming>) -> Result<(Option<u64>, Option<String>), AdminError> {
    let if_match = match req.headers().get(IF_MATCH) {
        None => None,
        Some(v) => parse_if_match(v)?,
    };
    let reason = req
        .headers()
        .get("x-change-reason")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    Ok((if_match, reason))
}

/// `?wait=done&timeout=600s` → how long to wait (None: answer now).
fn parse_wait(query: &str) -> Result<Option<std::time::Duration>, AdminError> {
    let mut wait = false;
    let mut timeout = std::time::Duration::from_secs(600);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "wait" if v == "done" => wait = true,
            "wait" => {
                return Err(AdminError::field(
                    "wait",
                    format!("expected \"done\", got {v:?}"),
                ))
            }
            "timeout" => {
                timeout = humantime::parse_duration(v)
                    .ok()
                    .filter(|d| *d <= std::time::Duration::from_secs(24 * 3600))
                    .ok_or_else(|| {
                        AdminError::field(
                            "timeout",
                            format!("expected a duration up to 24h like \"600s\", got {v:?}"),
                        )
                    })?;
            }
            _ => {}
        }
    }
    Ok(wait.then_some(timeout))
}

fn unknown_service(name: &str) -> AdminError {
    AdminError::UnknownService(name.to_string())
}

/// `If-Match: "7"` (or `7`, or `W/"7"`); `*` means no condition.
fn parse_if_match(v: &HeaderValue) -> Result<Option<u64>, AdminError> {
    let s = v.to_str().unwrap_or("").trim();
    if s == "*" {
        return Ok(None);
    }
    let s = s.strip_prefix("W/").unwrap_or(s);
    let s = s
        .strip_prefix('"')
        .and_then(|x| x.strip_suffix('"'))
        .unwrap_or(s);
    s.parse()
        .map(Some)
        .map_err(|_| AdminError::InvalidIfMatch(v.to_str().unwrap_or("?").to_string()))
}

/// Reads a JSON object body (empty body = `{}`), capped at [`MAX_BODY`].
async fn read_json(body: Incoming) -> Result<Map<String, Value>, AdminError> {
    parse_object(&read_limited(body, MAX_BODY).await?)
}

/// Reads a body of at most `limit` bytes.
async fn read_limited(body: Incoming, limit: usize) -> Result<Bytes, AdminError> {
    let bytes = match Limited::new(body, limit).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) => {
            return Err(
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some()
                {
                    AdminError::BodyTooLarge
                } else {
                    AdminError::BadBody(e.to_string())
                },
            )
        }
    };
    Ok(bytes)
}

/// A JSON object from a body (empty body = `{}`).
fn parse_object(bytes: &[u8]) -> Result<Map<String, Value>, AdminError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(AdminError::InvalidJson(
            "body must be a JSON object".to_string(),
        )),
        Err(e) => Err(AdminError::InvalidJson(format!("invalid JSON: {e}"))),
    }
}

/// Decodes a mutation body exactly as the API does, without applying it:
/// `action` is `switch`, `split`, `rollback`, `pools/blue`, `pools/green`,
/// `rules` or `mirror` (a PUT).
/// The error is `(status, code, message)`. For property tests and fuzzing;
/// never panics.
pub fn decode_mutation(
    action: &str,
    body: &[u8],
) -> Result<(Command, Option<String>), (StatusCode, &'static str, String)> {
    let refuse = |e: AdminError| (e.status(), e.code(), e.to_string());
    if body.len() > MAX_BODY {
        return Err(refuse(AdminError::BodyTooLarge));
    }
    let map = parse_object(body).map_err(refuse)?;
    match action {
        "switch" => decode_switch(&map),
        "split" => decode_split(&map),
        "rollback" => decode_rollback(&map),
        "pools/blue" => decode_pool(&map, Color::Blue),
        "pools/green" => decode_pool(&map, Color::Green),
        "rules" => decode_rules(&map),
        "mirror" => decode_mirror(&map),
        _ => Err(AdminError::NoSuchPath(action.to_string())),
    }
    .map_err(refuse)
}

/// Refuses fields not in `known` (comma-separated).
fn only(body: &Map<String, Value>, known: &'static str) -> Result<(), AdminError> {
    for k in body.keys() {
        if !known.split(", ").any(|f| f == k) {
            return Err(AdminError::UnknownField {
                field: k.clone(),
                expected: known,
            });
        }
    }
    Ok(())
}

fn get_bool(body: &Map<String, Value>, field: &'static str) -> Result<bool, AdminError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(AdminError::field(
            field,
            format!("expected true or false, got {v}"),
        )),
    }
}

fn get_reason(body: &Map<String, Value>) -> Result<Option<String>, AdminError> {
    match body.get("reason") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(v) => Err(AdminError::field(
            "reason",
            format!("expected a string, got {v}"),
        )),
    }
}

fn get_color(body: &Map<String, Value>, field: &'static str) -> Result<Color, AdminError> {
    match body.get(field) {
        None => Err(AdminError::field(field, "missing (\"blue\" or \"green\")")),
        Some(Value::String(s)) => s.parse().map_err(|()| {
            AdminError::field(
                field,
                format!("expected \"blue\" or \"green\", got \"{s}\""),
            )
        }),
        Some(v) => Err(AdminError::field(
            field,
            format!("expected \"blue\" or \"green\", got {v}"),
        )),
    }
}

fn get_percent(body: &Map<String, Value>, field: &'static str) -> Result<Option<f64>, AdminError> {
    match body.get(field) {
        None => Ok(None),
        Some(Value::Number(n)) => n
            .as_f64()
            .map(Some)
            .ok_or_else(|| AdminError::field(field, "not a number")),
        Some(v) => Err(AdminError::field(
            field,
            format!("expected a number from 0 to 100, got {v}"),
        )),
    }
}

fn decode_switch(body: &Map<String, Value>) -> Result<(Command, Option<String>), AdminError> {
    only(body, "to, force, reason")?;
    let to = get_color(body, "to")?;
    let force = get_bool(body, "force")?;
    Ok((Command::Switch { to, force }, get_reason(body)?))
}

fn decode_split(body: &Map<String, Value>) -> Result<(Command, Option<String>), AdminError> {
    only(body, "green, blue, force, reason")?;
    let green = get_percent(body, "green")?;
    let blue = get_percent(body, "blue")?;
    let weights = match (green, blue) {
        (Some(g), _) => {
            Weights::from_green_percent(g).map_err(|m| AdminError::field("green", m))?
        }
        (None, Some(b)) => {
            if !(0.0..=100.0).contains(&b) {
                return Err(AdminError::field(
                    "blue",
                    format!("must be a number from 0 to 100, got {b}"),
                ));
            }
            Weights::from_green_percent(100.0 - b).map_err(|m| AdminError::field("blue", m))?
        }
        (None, None) => {
            return Err(AdminError::field(
                "green",
                "missing (percent of traffic for green, 0 to 100)",
            ))
        }
    };
    if let (Some(_), Some(b)) = (green, blue) {
        if (weights.percent(Color::Blue) - b).abs() > 1e-6 {
            return Err(AdminError::field(
                "blue",
                format!(
                    "blue + green must be 100, got {b} + {}",
                    weights.percent(Color::Green)
                ),
            ));
        }
    }
    let force = get_bool(body, "force")?;
    Ok((Command::Split { weights, force }, get_reason(body)?))
}

fn decode_rollback(body: &Map<String, Value>) -> Result<(Command, Option<String>), AdminError> {
    only(body, "to_generation, force, reason")?;
    get_bool(body, "force")?;
    let to_generation = match body.get("to_generation") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => Some(n.as_u64().filter(|g| *g > 0).ok_or_else(|| {
            AdminError::field(
                "to_generation",
                format!("expected a positive integer, got {n}"),
            )
        })?),
        Some(v) => {
            return Err(AdminError::field(
                "to_generation",
                format!("expected a positive integer, got {v}"),
            ))
        }
    };
    Ok((Command::Rollback { to_generation }, get_reason(body)?))
}

fn decode_pool(
    body: &Map<String, Value>,
    color: Color,
) -> Result<(Command, Option<String>), AdminError> {
    only(body, "backends, force, reason")?;
    let list = match body.get("backends") {
        None => {
            return Err(AdminError::field(
                "backends",
                "missing (a list of \"host:port\")",
            ))
        }
        Some(Value::Array(a)) => a,
        Some(v) => {
            return Err(AdminError::field(
                "backends",
                format!("expected a list of \"host:port\", got {v}"),
            ))
        }
    };
    if list.len() > 1000 {
        return Err(AdminError::field("backends", "more than 1000 backends"));
    }
    let mut backends = Vec::with_capacity(list.len());
    for (i, v) in list.iter().enumerate() {
        let Value::String(s) = v else {
            return Err(AdminError::field(
                "backends",
                format!("[{i}]: expected a string \"host:port\", got {v}"),
            ));
        };
        backends.push(
            BackendAddr::parse(s)
                .map_err(|m| AdminError::field("backends", format!("[{i}]: {m}")))?,
        );
    }
    let force = get_bool(body, "force")?;
    Ok((
        Command::SetPool {
            color,
            backends,
            force,
        },
        get_reason(body)?,
    ))
}

/// `PUT …/mirror`: `{"to","percent","methods"?,"max_body_bytes"?,
/// "max_inflight"?,"timeout"?,"reason"?}` (SPEC §9); every problem names
/// its field.
fn decode_mirror(body: &Map<String, Value>) -> Result<(Command, Option<String>), AdminError> {
    only(
        body,
        "to, percent, methods, max_body_bytes, max_inflight, timeout, reason",
    )?;
    let spec = MirrorSpec::from_json(body).map_err(|e| AdminError::InvalidField {
        field: e.field,
        message: e.message,
    })?;
    Ok((Command::SetMirror { mirror: Some(spec) }, get_reason(body)?))
}

/// `DELETE …/mirror`: no body, or `{"reason"}`.
fn decode_mirror_off(body: &Map<String, Value>) -> Result<(Command, Option<String>), AdminError> {
    only(body, "reason")?;
    Ok((Command::SetMirror { mirror: None }, get_reason(body)?))
}

/// `{"rules":[{name, match, to, fallback}], "reason"?}`. Each rule is
/// decoded strictly (unknown fields refused) and checked; the first problem
/// names the rule and, if one is at fault, the condition.
fn decode_rules(body: &Map<String, Value>) -> Result<(Command, Option<String>), AdminError> {
    only(body, "rules, reason")?;
    let list = match body.get("rules") {
        None => {
            return Err(AdminError::field(
                "rules",
                "missing (a list of rules; [] for none)",
            ))
        }
        Some(Value::Array(a)) => a,
        Some(v) => {
            return Err(AdminError::field(
                "rules",
                format!("expected a list of rules, got {v}"),
            ))
        }
    };
    if list.len() > MAX_RULES {
        return Err(AdminError::field(
            "rules",
            format!("more than {MAX_RULES} rules"),
        ));
    }
    let mut rules = Vec::with_capacity(list.len());
    for (i, v) in list.iter().enumerate() {
        let label = v
            .get("name")
            .and_then(Value::as_str)
            .map_or_else(|| format!("#{i}"), |n| format!("{n:?}"));
        let rule = RuleSpec::deserialize(v)
            .map_err(|e| AdminError::field("rules", format!("[{i}] (rule {label}): {e}")))?;
        rules.push(rule);
    }
    if let Some(e) = check_rules(&rules).into_iter().next() {
        return Err(AdminError::Control(ControlError::Command(
            CommandError::BadRule(e),
        )));
    }
    Ok((Command::SetRules { rules }, get_reason(body)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(s: &str) -> Map<String, Value> {
        match serde_json::from_str(s) {
            Ok(Value::Object(m)) => m,
            _ => Map::new(),
        }
    }

    #[test]
    fn a_verb_for_a_rollout_driven_elsewhere_is_a_rollout_state_conflict() {
        // Fleet mode: the rollout was taken over by another replica; the
        // same answer as a verb sent to a replica that does not drive it.
        let e: AdminError = RolloutError::Control(ControlError::Command(
            CommandError::RolloutDrivenElsewhere {
                id: "web-1".into(),
                driver: "b".into(),
            },
        ))
        .into();
        assert_eq!(
            (e.status(), e.code()),
            (StatusCode::CONFLICT, "rollout_state")
        );
        let active: AdminError =
            ControlError::Command(CommandError::RolloutActive("web".into())).into();
        assert_eq!(active.code(), "rollout_active");
    }

    #[test]
    fn decoding_names_the_field() {
        let e = decode_switch(&obj(r#"{"to":"purple"}"#)).expect_err("refused");
        assert_eq!(e.field_name(), Some("to"));
        assert!(e.to_string().contains("purple"));
        let e = decode_switch(&obj(r#"{"to":"green","colour":1}"#)).expect_err("refused");
        assert_eq!(e.code(), "unknown_field");
        assert!(e.to_string().contains("colour"));
        let e = decode_split(&obj(r#"{"green":150}"#)).expect_err("refused");
        assert_eq!(e.field_name(), Some("green"));
        let e = decode_split(&obj(r#"{"green":"10"}"#)).expect_err("refused");
        assert_eq!(e.field_name(), Some("green"));
        let e = decode_split(&obj(r#"{"green":10,"blue":80}"#)).expect_err("refused");
        assert_eq!(e.field_name(), Some("blue"));
        assert!(decode_split(&obj(r#"{"green":12.5,"blue":87.5}"#)).is_ok());
        let e =
            decode_pool(&obj(r#"{"backends":["127.0.0.1"]}"#), Color::Green).expect_err("refused");
        assert!(
            e.to_string().contains("[0]") && e.to_string().contains("port"),
            "{}",
            e
        );
        let e = decode_rollback(&obj(r#"{"to_generation":-1}"#)).expect_err("refused");
        assert_eq!(e.field_name(), Some("to_generation"));
        assert!(matches!(
            decode_rollback(&Map::new()),
            Ok((
                Command::Rollback {
                    to_generation: None
                },
                None
            ))
        ));
    }

    #[test]
    fn codes_are_fixed_per_variant() {
        let build = AdminError::from(ControlError::Build("CA file gone".into()));
        assert_eq!(build.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(build.code(), "build_failed");
        let stale = AdminError::from(ControlError::Command(CommandError::StaleGeneration {
            expected: 1,
            current: 2,
        }));
        assert_eq!(stale.status(), StatusCode::PRECONDITION_FAILED);
        assert_eq!(stale.code(), "stale_generation");
        let reload = AdminError::from(ReloadError::NoFile);
        assert_eq!(
            (reload.status(), reload.code()),
            (StatusCode::CONFLICT, "no_config_file")
        );
        let r = error_response(&AdminError::MethodNotAllowed("PUT"));
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(
            r.headers().get(ALLOW).map(HeaderValue::as_bytes),
            Some(&b"PUT"[..])
        );
    }

    #[test]
    fn if_match_forms() {
        let p = |s: &'static str| parse_if_match(&HeaderValue::from_static(s)).ok().flatten();
        assert_eq!(p("\"7\""), Some(7));
        assert_eq!(p("7"), Some(7));
        assert_eq!(p("W/\"7\""), Some(7));
        assert_eq!(p("*"), None);
        assert!(parse_if_match(&HeaderValue::from_static("\"x\"")).is_err());
    }
}
