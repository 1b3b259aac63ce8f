//! Errors the proxy answers itself (SPEC §6), and the one place they become
//! responses.

use std::time::Duration;

use http::StatusCode;

use crate::color::Color;
use crate::data_plane::backend::ConnectError;
use crate::metrics::UpstreamErrorKind;

/// Who is at fault, which decides the status and whether a retry may help.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProxyError {
    /// The request is malformed (missing/invalid Host, bad target, ...).
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    /// The request target is longer than [`crate::data_plane::proxy::MAX_TARGET_BYTES`].
    #[error("request target too long")]
    UriTooLong,
    /// No service matches host and path.
    #[error("no service matches this host and path")]
    NoRoute,
    /// The chosen pool (and, unless preview, the other) has no available backend.
    #[error("no healthy backend in pool {0}")]
    NoHealthyBackend(Color),
    /// Could not connect to the backend.
    #[error("cannot connect to backend {backend}: {source}")]
    Connect {
        /// The backend.
        backend: String,
        /// Why.
        source: ConnectError,
    },
    /// The backend broke the exchange before a response head.
    #[error("backend {backend} failed: {source}")]
    Upstream {
        /// The backend.
        backend: String,
        /// hyper's error.
        source: hyper::Error,
    },
    /// The backend switched protocols though the client asked for no upgrade.
    #[error("backend {backend} answered 101 to a request without Upgrade")]
    UnexpectedUpgrade {
        /// The backend.
        backend: String,
    },
    /// No response head within `request_timeout`.
    #[error("backend {backend} sent no response within {timeout:?}")]
    Timeout {
        /// The backend.
        backend: String,
        /// The bound.
        timeout: Duration,
    },
}

impl ProxyError {
    /// The status code answered. Exhaustive on purpose: a new variant must
    /// decide its status here.
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::UriTooLong => StatusCode::URI_TOO_LONG,
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::NoHealthyBackend(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Connect {
                source: ConnectError::Timeout,
                ..
            } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Connect { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::Upstream { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::UnexpectedUpgrade { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The `kind` label of `switchyard_upstream_errors_total`, if upstream.
    pub(crate) fn upstream_kind(&self) -> Option<UpstreamErrorKind> {
        match self {
            ProxyError::BadRequest(_)
            | ProxyError::UriTooLong
            | ProxyError::NoRoute
            | ProxyError::NoHealthyBackend(_) => None,
            ProxyError::Connect { source, .. } => Some(match source {
                ConnectError::Timeout => UpstreamErrorKind::Timeout,
                ConnectError::Tls(_) => UpstreamErrorKind::Tls,
                ConnectError::Resolve { .. } | ConnectError::Io(_) | ConnectError::Handshake(_) => {
                    UpstreamErrorKind::Connect
                }
            }),
            ProxyError::Upstream { .. } | ProxyError::UnexpectedUpgrade { .. } => {
                Some(UpstreamErrorKind::Reset)
            }
            ProxyError::Timeout { .. } => Some(UpstreamErrorKind::Timeout),
        }
    }

    /// The short body sent to the client: what went wrong, not internals.
    pub(crate) fn body(&self) -> &'static str {
        match self {
            ProxyError::BadRequest(why) => why,
            ProxyError::UriTooLong => "414 request target too long\n",
            ProxyError::NoRoute => "404 no service matches this host and path\n",
            ProxyError::NoHealthyBackend(Color::Blue) => "503 no healthy backend (pool blue)\n",
            ProxyError::NoHealthyBackend(Color::Green) => "503 no healthy backend (pool green)\n",
            ProxyError::Connect {
                source: ConnectError::Timeout,
                ..
            } => "504 upstream connect timed out\n",
            ProxyError::Connect { .. } => "502 upstream refused the connection\n",
            ProxyError::Upstream { .. } => "502 upstream broke the connection\n",
            ProxyError::UnexpectedUpgrade { .. } => "502 upstream switched protocols unasked\n",
            ProxyError::Timeout { .. } => "504 upstream timed out\n",
        }
    }
}
