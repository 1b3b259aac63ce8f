//! Backend health: active checks and passive ejection.
//!
//! Active checks run in one task per backend, off the request path; they
//! write the backend's health atomic, which the request path reads. The
//! hysteresis ([`Hysteresis`]) is a pure counter: it reports a value only
//! when the state flips.
//!
//! Passive ejection (consecutive failures seen by real requests) is decided
//! in [`crate::data_plane::upstream`].

use std::sync::{Arc, Weak};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;

use crate::config::{HealthConfig, Scheme};
use crate::data_plane::backend::{Backend, Health};

/// Consecutive-result counter with thresholds.
#[derive(Debug, Clone)]
pub(crate) struct Hysteresis {
    healthy: bool,
    streak: u32,
    unhealthy_after: u32,
    healthy_after: u32,
}

impl Hysteresis {
    /// Starts in `healthy`.
    pub(crate) fn new(healthy: bool, unhealthy_after: u32, healthy_after: u32) -> Hysteresis {
        Hysteresis {
            healthy,
            streak: 0,
            unhealthy_after: unhealthy_after.max(1),
            healthy_after: healthy_after.max(1),
        }
    }

    /// Records one check; returns the new state only when it flips.
    pub(crate) fn record(&mut self, ok: bool) -> Option<bool> {
        if ok == self.healthy {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if ok {
            self.healthy_after
        } else {
            self.unhealthy_after
        };
        if self.streak >= needed {
            self.healthy = ok;
            self.streak = 0;
            Some(ok)
        } else {
            None
        }
    }
}

/// Starts the active check task of `backend`, replacing the one it had
/// (which stops at its next tick). It stops by itself when the backend is
/// retired or dropped.
pub(crate) fn spawn_checker(
    backend: &Arc<Backend>,
    cfg: HealthConfig,
    service: Arc<str>,
    pool: &'static str,
) {
    let weak: Weak<Backend> = Arc::downgrade(backend);
    let claim = backend.claim_checker();
    let start_healthy = backend.health() == Health::Healthy;
    tokio::spawn(async move {
        let mut hyst = Hysteresis::new(start_healthy, cfg.unhealthy_after, cfg.healthy_after);
        let mut unknown = !start_healthy
            && weak
                .upgrade()
                .is_some_and(|b| b.health() == Health::Unknown);
        let mut interval = tokio::time::interval(cfg.interval);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            let Some(backend) = weak.upgrade() else {
                return;
            };
            if backend.is_retired() || backend.current_checker() != claim {
                return;
            }
            let ok = check_once(&backend, &cfg).await;
            // A backend added through the API takes traffic after its
            // first passing check (SPEC §3).
            let flip = if unknown && ok {
                unknown = false;
                hyst = Hysteresis::new(true, cfg.unhealthy_after, cfg.healthy_after);
                Some(true)
            } else {
                hyst.record(ok)
            };
            if let Some(healthy) = flip {
                backend.set_health(if healthy {
                    Health::Healthy
                } else {
                    Health::Unhealthy
                });
                if healthy {
                    tracing::info!(service = %service, pool, backend = %backend.label, "backend healthy");
                } else {
                    tracing::warn!(service = %service, pool, backend = %backend.label, "backend unhealthy");
                }
            } else if ok && backend.is_ejected() {
                // A passing check after the back-off ends a passive
                // ejection: the backend returns through the active check.
                backend.set_health(Health::Healthy);
            }
        }
    });
}

/// One GET of the health path on a fresh connection; 2xx/3xx within the
/// timeout passes.
pub(crate) async fn check_once(backend: &Backend, cfg: &HealthConfig) -> bool {
    let fut = async {
        let conn = backend_probe(backend, cfg).await;
        matches!(conn, Some(s) if s.is_success() || s.is_redirection())
    };
    tokio::time::timeout(cfg.timeout, fut)
        .await
        .unwrap_or(false)
}

async fn backend_probe(backend: &Backend, cfg: &HealthConfig) -> Option<StatusCode> {
    let tcp = tokio::net::TcpStream::connect((backend.addr.host.as_str(), backend.addr.port))
        .await
        .ok()?;
    let req = Request::get(cfg.path.as_str())
        .header(http::header::HOST, backend.addr.authority())
        .header(http::header::USER_AGENT, "switchyard-health")
        .body(Empty::<Bytes>::new())
        .ok()?;
    match backend.addr.scheme {
        Scheme::Http => send(TokioIo::new(tcp), req).await,
        Scheme::Https => {
            let tls = backend.tls()?;
            let stream = tls.connect(&backend.addr.host, tcp).await.ok()?;
            send(TokioIo::new(stream), req).await
        }
    }
}

async fn send<T>(io: T, req: Request<Empty<Bytes>>) -> Option<StatusCode>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.ok()?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let resp = sender.send_request(req).await.ok()?;
    Some(resp.status())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hysteresis_flips_only_after_thresholds() {
        let mut h = Hysteresis::new(true, 3, 2);
        assert_eq!(h.record(false), None);
        assert_eq!(h.record(false), None);
        assert_eq!(h.record(true), None, "a pass resets the failure streak");
        assert_eq!(h.record(false), None);
        assert_eq!(h.record(false), None);
        assert_eq!(h.record(false), Some(false));
        assert_eq!(h.record(false), None);
        assert_eq!(h.record(true), None);
        assert_eq!(h.record(true), Some(true));
    }
}
