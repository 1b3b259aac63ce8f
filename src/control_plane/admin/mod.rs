//! The admin listener (SPEC §4 and §5): `/healthz`, `/readyz`, `/metrics`,
//! and the JSON API under `/api/v1`, as a small hyper service routed with
//! one `match`.
//!
//! Request bodies are capped at 1 MiB and decoded by hand from JSON values,
//! so that every refusal names the field at fault; unknown fields are
//! refused. Every mutation goes through [`Control::execute`].

pub(crate) mod auth;
pub(crate) mod events;
pub(crate) mod guard;
pub(crate) mod stats;
pub(crate) mod ui;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::header::{HeaderValue, ALLOW, AUTHORIZATION, CONTENT_TYPE, IF_MATCH};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde_json::{json, Map, Value};

use crate::color::Color;
use crate::config::BackendAddr;
use crate::control_plane::control::{Control, ControlError, ReloadError};
use crate::control_plane::state::{ChangeMeta, Command, CommandError};
use crate::metrics::Metrics;
use crate::weights::Weights;

/// Largest admin request body.
pub(crate) const MAX_BODY: usize = 1 << 20;

/// Shared by admin connections.
pub(crate) struct Admin {
    control: Arc<Control>,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
}

/// A refusal: status, code, message, and the field at fault if any.
struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    field: Option<&'static str>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            field: None,
        }
    }

    fn field(field: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            code: "invalid_field",
            message: format!("{field}: {}", message.into()),
            field: Some(field),
        }
    }

    fn not_found(what: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", what)
    }
}

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> ApiError {
        let message = e.to_string();
        match e {
            ControlError::Command(c) => match c {
                CommandError::UnknownService(_) => {
                    ApiError::new(StatusCode::NOT_FOUND, "unknown_service", message)
                }
                CommandError::BadField { field, .. } => ApiError {
                    status: StatusCode::BAD_REQUEST,
                    code: "invalid_field",
                    message,
                    field: Some(field),
                },
                CommandError::NoHealthyBackend(_) => {
                    ApiError::new(StatusCode::CONFLICT, "no_healthy_backend", message)
                }
                CommandError::PoolTakesTraffic { .. } => {
                    ApiError::new(StatusCode::CONFLICT, "pool_takes_traffic", message)
                }
                CommandError::StaleGeneration { .. } => {
                    ApiError::new(StatusCode::PRECONDITION_FAILED, "stale_generation", message)
                }
                CommandError::NothingToRollBack => {
                    ApiError::new(StatusCode::CONFLICT, "nothing_to_roll_back", message)
                }
            },
            ControlError::Build(_) | ControlError::Persist(_) => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "persist_failed", message)
            }
        }
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

fn error_response(e: ApiError) -> AdminResponse {
    let mut err = Map::new();
    err.insert("code".into(), Value::from(e.code));
    err.insert("message".into(), Value::from(e.message));
    if let Some(f) = e.field {
        err.insert("field".into(), Value::from(f));
    }
    json_response(e.status, &json!({ "error": err }))
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

fn method_not_allowed(allow: &'static str) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("method not allowed here; allowed: {allow}"),
    )
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
        let resp = match self.route(req, &path, peer).await {
            Ok(r) => r,
            Err(e) => {
                let allow = (e.status == StatusCode::METHOD_NOT_ALLOWED).then(|| allowed(&path));
                let mut r = error_response(e);
                if let Some(Some(a)) = allow {
                    r.headers_mut().insert(ALLOW, HeaderValue::from_static(a));
                }
                r
            }
        };
        Ok(resp)
    }

    async fn route(
        &self,
        req: Request<Incoming>,
        path: &str,
        peer: SocketAddr,
    ) -> Result<AdminResponse, ApiError> {
        let method = req.method().clone();
        match path {
            "/healthz" => return Ok(text_response(StatusCode::OK, "ok\n")),
            "/readyz" => {
                return Ok(if self.ready.load(Ordering::Relaxed) {
                    text_response(StatusCode::OK, "ready\n")
                } else {
                    text_response(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                })
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
            return Err(ApiError::not_found(format!("no such path `{path}`")));
        };
        let tokens = self.control.tokens();
        let actor = if tokens.required() {
            let given = req.headers().get(AUTHORIZATION).map(HeaderValue::as_bytes);
            match tokens.check(given) {
                Some(name) => name.to_string(),
                None => {
                    return Err(ApiError::new(
                        StatusCode::UNAUTHORIZED,
                        "unauthorized",
                        "missing or invalid bearer token (Authorization: Bearer TOKEN)",
                    ))
                }
            }
        } else {
            peer.ip().to_string()
        };
        let segments: Vec<&str> = api.trim_end_matches('/').split('/').collect();
        match (segments.as_slice(), &method) {
            (["services"], &Method::GET) => {
                Ok(json_response(StatusCode::OK, &self.control.views()))
            }
            (["services"], _) => Err(method_not_allowed("GET")),
            (["services", name], &Method::GET) => self
                .control
                .view(name)
                .map(|v| json_response(StatusCode::OK, &v))
                .ok_or_else(|| unknown_service(name)),
            (["services", _], _) => Err(method_not_allowed("GET")),
            (["services", name, "history"], &Method::GET) => self
                .control
                .history(name)
                .await
                .map(|h| json_response(StatusCode::OK, &h))
                .ok_or_else(|| unknown_service(name)),
            (["services", _, "history"], _) => Err(method_not_allowed("GET")),
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
                Err(method_not_allowed("POST"))
            }
            (["services", name, "pools", color], &Method::PUT) => {
                let color: Color = color.parse().map_err(|()| {
                    ApiError::new(
                        StatusCode::NOT_FOUND,
                        "unknown_color",
                        format!("unknown pool `{color}` (blue or green)"),
                    )
                })?;
                let name = name.to_string();
                self.mutate(req, &name, actor, |body| decode_pool(body, color))
                    .await
            }
            (["services", _, "pools", _], _) => Err(method_not_allowed("PUT")),
            (["reload"], &Method::POST) => match self.control.reload().await {
                Ok(()) => Ok(json_response(
                    StatusCode::OK,
                    &json!({ "reloaded": true, "services": self.control.views() }),
                )),
                Err(e) => Err(match e {
                    ReloadError::NoFile => {
                        ApiError::new(StatusCode::CONFLICT, "no_config_file", e.to_string())
                    }
                    ReloadError::Config(_) | ReloadError::Files(_) => {
                        ApiError::new(StatusCode::BAD_REQUEST, "invalid_config", e.to_string())
                    }
                    ReloadError::Persist(_) => ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "persist_failed",
                        e.to_string(),
                    ),
                }),
            },
            (["reload"], _) => Err(method_not_allowed("POST")),
            _ => Err(ApiError::not_found(format!("no such path `{path}`"))),
        }
    }

    /// Reads, decodes and applies a mutation.
    async fn mutate(
        &self,
        req: Request<Incoming>,
        service: &str,
        actor: String,
        decode: impl FnOnce(&Map<String, Value>) -> Result<(Command, Option<String>), ApiError>,
    ) -> Result<AdminResponse, ApiError> {
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
                return Err(ApiError::field("reason", "longer than 1024 characters"));
            }
        }
        let meta = ChangeMeta {
            actor,
            reason,
            at: SystemTime::now(),
            if_match,
        };
        let view = self.control.execute(service, cmd, meta).await?;
        Ok(json_response(StatusCode::OK, &view))
    }
}

fn allowed(path: &str) -> Option<&'static str> {
    let api = path.strip_prefix("/api/v1/")?.trim_end_matches('/');
    let segs: Vec<&str> = api.split('/').collect();
    Some(match segs.as_slice() {
        ["services"] | ["services", _] | ["services", _, "history"] => "GET",
        ["services", _, "pools", _] => "PUT",
        _ => "POST",
    })
}

fn unknown_service(name: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "unknown_service",
        format!("unknown service `{name}`"),
    )
}

/// `If-Match: "7"` (or `7`, or `W/"7"`); `*` means no condition.
fn parse_if_match(v: &HeaderValue) -> Result<Option<u64>, ApiError> {
    let s = v.to_str().unwrap_or("").trim();
    if s == "*" {
        return Ok(None);
    }
    let s = s.strip_prefix("W/").unwrap_or(s);
    let s = s
        .strip_prefix('"')
        .and_then(|x| x.strip_suffix('"'))
        .unwrap_or(s);
    s.parse().map(Some).map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_header",
            format!(
                "If-Match: expected a generation like \"7\", got `{}`",
                v.to_str().unwrap_or("?")
            ),
        )
    })
}

/// Reads a JSON object body (empty body = `{}`), capped at [`MAX_BODY`].
async fn read_json(body: Incoming) -> Result<Map<String, Value>, ApiError> {
    let bytes = match Limited::new(body, MAX_BODY).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) => {
            return Err(
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some()
                {
                    ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "body_too_large",
                        format!("request body larger than {MAX_BODY} bytes"),
                    )
                } else {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "bad_body",
                        format!("cannot read body: {e}"),
                    )
                },
            )
        }
    };
    parse_object(&bytes)
}

/// A JSON object from a body (empty body = `{}`).
fn parse_object(bytes: &[u8]) -> Result<Map<String, Value>, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            "body must be a JSON object",
        )),
        Err(e) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("invalid JSON: {e}"),
        )),
    }
}

/// Decodes a mutation body exactly as the API does, without applying it:
/// `action` is `switch`, `split`, `rollback`, `pools/blue` or `pools/green`.
/// The error is `(status, code, message)`. For property tests and fuzzing;
/// never panics.
pub fn decode_mutation(
    action: &str,
    body: &[u8],
) -> Result<(Command, Option<String>), (StatusCode, &'static str, String)> {
    let refuse = |e: ApiError| (e.status, e.code, e.message);
    if body.len() > MAX_BODY {
        return Err((
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("request body larger than {MAX_BODY} bytes"),
        ));
    }
    let map = parse_object(body).map_err(refuse)?;
    match action {
        "switch" => decode_switch(&map),
        "split" => decode_split(&map),
        "rollback" => decode_rollback(&map),
        "pools/blue" => decode_pool(&map, Color::Blue),
        "pools/green" => decode_pool(&map, Color::Green),
        _ => Err(ApiError::not_found(format!("no such action `{action}`"))),
    }
    .map_err(refuse)
}

/// Refuses fields not in `known`.
fn only(body: &Map<String, Value>, known: &[&str]) -> Result<(), ApiError> {
    for k in body.keys() {
        if !known.contains(&k.as_str()) {
            return Err(ApiError {
                status: StatusCode::BAD_REQUEST,
                code: "unknown_field",
                message: format!("unknown field `{k}` (expected: {})", known.join(", ")),
                field: None,
            });
        }
    }
    Ok(())
}

fn get_bool(body: &Map<String, Value>, field: &'static str) -> Result<bool, ApiError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(ApiError::field(
            field,
            format!("expected true or false, got {v}"),
        )),
    }
}

fn get_reason(body: &Map<String, Value>) -> Result<Option<String>, ApiError> {
    match body.get("reason") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(v) => Err(ApiError::field(
            "reason",
            format!("expected a string, got {v}"),
        )),
    }
}

fn get_color(body: &Map<String, Value>, field: &'static str) -> Result<Color, ApiError> {
    match body.get(field) {
        None => Err(ApiError::field(field, "missing (\"blue\" or \"green\")")),
        Some(Value::String(s)) => s.parse().map_err(|()| {
            ApiError::field(
                field,
                format!("expected \"blue\" or \"green\", got \"{s}\""),
            )
        }),
        Some(v) => Err(ApiError::field(
            field,
            format!("expected \"blue\" or \"green\", got {v}"),
        )),
    }
}

fn get_percent(body: &Map<String, Value>, field: &'static str) -> Result<Option<f64>, ApiError> {
    match body.get(field) {
        None => Ok(None),
        Some(Value::Number(n)) => n
            .as_f64()
            .map(Some)
            .ok_or_else(|| ApiError::field(field, "not a number")),
        Some(v) => Err(ApiError::field(
            field,
            format!("expected a number from 0 to 100, got {v}"),
        )),
    }
}

fn decode_switch(body: &Map<String, Value>) -> Result<(Command, Option<String>), ApiError> {
    only(body, &["to", "force", "reason"])?;
    let to = get_color(body, "to")?;
    let force = get_bool(body, "force")?;
    Ok((Command::Switch { to, force }, get_reason(body)?))
}

fn decode_split(body: &Map<String, Value>) -> Result<(Command, Option<String>), ApiError> {
    only(body, &["green", "blue", "force", "reason"])?;
    let green = get_percent(body, "green")?;
    let blue = get_percent(body, "blue")?;
    let weights = match (green, blue) {
        (Some(g), _) => Weights::from_green_percent(g).map_err(|m| ApiError::field("green", m))?,
        (None, Some(b)) => {
            if !(0.0..=100.0).contains(&b) {
                return Err(ApiError::field(
                    "blue",
                    format!("must be a number from 0 to 100, got {b}"),
                ));
            }
            Weights::from_green_percent(100.0 - b).map_err(|m| ApiError::field("blue", m))?
        }
        (None, None) => {
            return Err(ApiError::field(
                "green",
                "missing (percent of traffic for green, 0 to 100)",
            ))
        }
    };
    if let (Some(_), Some(b)) = (green, blue) {
        if (weights.percent(Color::Blue) - b).abs() > 1e-6 {
            return Err(ApiError::field(
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

fn decode_rollback(body: &Map<String, Value>) -> Result<(Command, Option<String>), ApiError> {
    only(body, &["to_generation", "reason"])?;
    let to_generation = match body.get("to_generation") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => Some(n.as_u64().filter(|g| *g > 0).ok_or_else(|| {
            ApiError::field(
                "to_generation",
                format!("expected a positive integer, got {n}"),
            )
        })?),
        Some(v) => {
            return Err(ApiError::field(
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
) -> Result<(Command, Option<String>), ApiError> {
    only(body, &["backends", "force", "reason"])?;
    let list = match body.get("backends") {
        None => {
            return Err(ApiError::field(
                "backends",
                "missing (a list of \"host:port\")",
            ))
        }
        Some(Value::Array(a)) => a,
        Some(v) => {
            return Err(ApiError::field(
                "backends",
                format!("expected a list of \"host:port\", got {v}"),
            ))
        }
    };
    if list.len() > 1000 {
        return Err(ApiError::field("backends", "more than 1000 backends"));
    }
    let mut backends = Vec::with_capacity(list.len());
    for (i, v) in list.iter().enumerate() {
        let Value::String(s) = v else {
            return Err(ApiError::field(
                "backends",
                format!("[{i}]: expected a string \"host:port\", got {v}"),
            ));
        };
        backends.push(
            BackendAddr::parse(s)
                .map_err(|m| ApiError::field("backends", format!("[{i}]: {m}")))?,
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
    fn decoding_names_the_field() {
        let e = decode_switch(&obj(r#"{"to":"purple"}"#)).expect_err("refused");
        assert_eq!(e.field, Some("to"));
        assert!(e.message.contains("purple"));
        let e = decode_switch(&obj(r#"{"to":"green","colour":1}"#)).expect_err("refused");
        assert_eq!(e.code, "unknown_field");
        assert!(e.message.contains("colour"));
        let e = decode_split(&obj(r#"{"green":150}"#)).expect_err("refused");
        assert_eq!(e.field, Some("green"));
        let e = decode_split(&obj(r#"{"green":"10"}"#)).expect_err("refused");
        assert_eq!(e.field, Some("green"));
        let e = decode_split(&obj(r#"{"green":10,"blue":80}"#)).expect_err("refused");
        assert_eq!(e.field, Some("blue"));
        assert!(decode_split(&obj(r#"{"green":12.5,"blue":87.5}"#)).is_ok());
        let e =
            decode_pool(&obj(r#"{"backends":["127.0.0.1"]}"#), Color::Green).expect_err("refused");
        assert!(
            e.message.contains("[0]") && e.message.contains("port"),
            "{}",
            e.message
        );
        let e = decode_rollback(&obj(r#"{"to_generation":-1}"#)).expect_err("refused");
        assert_eq!(e.field, Some("to_generation"));
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
    fn if_match_forms() {
        let p = |s: &'static str| parse_if_match(&HeaderValue::from_static(s)).ok().flatten();
        assert_eq!(p("\"7\""), Some(7));
        assert_eq!(p("7"), Some(7));
        assert_eq!(p("W/\"7\""), Some(7));
        assert_eq!(p("*"), None);
        assert!(parse_if_match(&HeaderValue::from_static("\"x\"")).is_err());
    }
}
