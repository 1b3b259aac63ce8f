//! Errors the proxy answers itself (SPEC §6), and the one place they become
//! responses ([`ProxyError::into_response`]).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CONNECTION, CONTENT_TYPE};
use http::{Response, StatusCode};

use crate::color::Color;
use crate::data_plane::backend::ConnectError;
use crate::data_plane::exchange::{pool_header, Exchange, ProxyBody};
use crate::data_plane::h1client::UpstreamError;
use crate::data_plane::headers::{X_REQUEST_ID, X_SWITCHYARD_POOL};
use crate::data_plane::routing::Settings;
use crate::metrics::{Metrics, UpstreamErrorKind};

/// Who is at fault, which decides the status and whether a retry may help.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProxyError {
    /// The request is malformed (missing/invalid Host, bad target, ...);
    /// the text says how, without the status.
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    /// The request target is longer than [`crate::data_plane::headers::MAX_TARGET_BYTES`].
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
        /// What went wrong.
        source: UpstreamError,
        /// The connection broke (reset, closed early), as opposed to the
        /// backend answering garbage: a retry may help.
        reset: bool,
        /// It broke on a pooled connection the backend had closed while
        /// idle: no fault of the backend.
        stale: bool,
    },
    /// The backend switched protocols though the client asked for no upgrade.
    #[error("backend {backend} answered 101 to a request without Upgrade")]
    UnexpectedUpgrade {
        /// The backend.
        backend: String,
    },
    /// The response head had more fields than `max_response_headers` (or
    /// exceeded hyper's head size limit). Not the backend's health: it is
    /// not ejected for it.
    #[error("backend {backend} sent a response head over the limit: {source}")]
    HeadTooLarge {
        /// The backend.
        backend: String,
        /// What went wrong.
        source: UpstreamError,
    },
    /// The response body broke off before its end (after the head was
    /// sent to the client).
    #[error("backend {backend} cut the response body short: {source}")]
    Truncated {
        /// The backend.
        backend: String,
        /// What went wrong.
        source: UpstreamError,
    },
    /// The response body was silent for longer than `upstream_read_timeout`.
    #[error("backend {backend} sent nothing of the response body for {timeout:?}")]
    ReadTimeout {
        /// The backend.
        backend: String,
        /// The bound.
        timeout: Duration,
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
            ProxyError::UnexpectedUpgrade { .. }
            | ProxyError::HeadTooLarge { .. }
            | ProxyError::Truncated { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout { .. } | ProxyError::ReadTimeout { .. } => {
                StatusCode::GATEWAY_TIMEOUT
            }
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
                ConnectError::Resolve { .. } | ConnectError::Io(_) => UpstreamErrorKind::Connect,
            }),
            ProxyError::Upstream { .. } | ProxyError::UnexpectedUpgrade { .. } => {
                Some(UpstreamErrorKind::Reset)
            }
            ProxyError::HeadTooLarge { .. } => Some(UpstreamErrorKind::HeadTooLarge),
            ProxyError::Truncated { .. } => Some(UpstreamErrorKind::Truncated),
            ProxyError::Timeout { .. } | ProxyError::ReadTimeout { .. } => {
                Some(UpstreamErrorKind::Timeout)
            }
        }
    }

    /// Is the backend at fault, so that this error counts towards its
    /// passive ejection?
    pub(crate) fn blames_backend(&self) -> bool {
        match self {
            ProxyError::BadRequest(_)
            | ProxyError::UriTooLong
            | ProxyError::NoRoute
            | ProxyError::NoHealthyBackend(_)
            | ProxyError::HeadTooLarge { .. } => false,
            ProxyError::Upstream { stale, .. } => !stale,
            ProxyError::Connect { .. }
            | ProxyError::UnexpectedUpgrade { .. }
            | ProxyError::Truncated { .. }
            | ProxyError::ReadTimeout { .. }
            | ProxyError::Timeout { .. } => true,
        }
    }

    /// Could sending the request again help? Connect failures and broken
    /// connections yes; timeouts (the backend may still be working on it),
    /// garbage and the client's own errors no. Whether a retry is actually
    /// made also depends on the method, the body and the retry budget
    /// ([`crate::data_plane::upstream::Attempts`]).
    pub(crate) fn is_retryable(&self) -> bool {
        match self {
            ProxyError::Connect { .. } => true,
            ProxyError::Upstream { reset, .. } => *reset,
            ProxyError::BadRequest(_)
            | ProxyError::UriTooLong
            | ProxyError::NoRoute
            | ProxyError::NoHealthyBackend(_)
            | ProxyError::UnexpectedUpgrade { .. }
            | ProxyError::HeadTooLarge { .. }
            | ProxyError::Truncated { .. }
            | ProxyError::ReadTimeout { .. }
            | ProxyError::Timeout { .. } => false,
        }
    }

    /// The short body sent to the client: what went wrong, not internals.
    pub(crate) fn body(&self) -> Bytes {
        Bytes::from_static(match self {
            ProxyError::BadRequest(why) => return Bytes::from(format!("400 {why}\n")),
            ProxyError::UriTooLong => b"414 request target too long\n",
            ProxyError::NoRoute => b"404 no service matches this host and path\n",
            ProxyError::NoHealthyBackend(Color::Blue) => b"503 no healthy backend (pool blue)\n",
            ProxyError::NoHealthyBackend(Color::Green) => b"503 no healthy backend (pool green)\n",
            ProxyError::Connect {
                source: ConnectError::Timeout,
                ..
            } => b"504 upstream connect timed out\n",
            ProxyError::Connect { .. } => b"502 upstream refused the connection\n",
            ProxyError::Upstream { .. } => b"502 upstream broke the connection\n",
            ProxyError::UnexpectedUpgrade { .. } => b"502 upstream switched protocols unasked\n",
            ProxyError::HeadTooLarge { .. } => b"502 upstream response head too large\n",
            ProxyError::Truncated { .. } => b"502 upstream cut the response short\n",
            ProxyError::Timeout { .. } | ProxyError::ReadTimeout { .. } => {
                b"504 upstream timed out\n"
            }
        })
    }

    /// The response for this error: the only place a data-plane error
    /// becomes a response. `ex` is settled when the body ends.
    pub(crate) fn into_response(
        self,
        mut ex: Exchange,
        settings: &Settings,
        metrics: &Arc<Metrics>,
    ) -> Response<ProxyBody> {
        let status = self.status();
        ex.status = status.as_u16();
        if ex.routed.is_none() {
            ex.count_unmatched(Arc::clone(metrics));
        }
        tracing::debug!(error = %self, status = ex.status, "proxy answered itself");
        let request_id = ex.request_id.clone();
        let pool = ex.choice.map(|c| c.color);
        if let Some(log) = &mut ex.log {
            log.error = Some(self.to_string());
        }
        let mut resp = Response::new(ProxyBody::full(self.body(), Some(ex)));
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if let Some(id) = request_id {
            h.insert(X_REQUEST_ID.clone(), id);
        }
        if let (Some(color), true) = (pool, settings.add_pool_header) {
            h.insert(X_SWITCHYARD_POOL.clone(), pool_header(color));
        }
        if status == StatusCode::BAD_REQUEST {
            // After a malformed request the stream may be out of sync.
            h.insert(CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}
