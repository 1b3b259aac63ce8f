//! Upgraded connections (WebSocket and other HTTP/1.1 `Upgrade`s).
//!
//! After the backend answers 101, the client and backend byte streams are
//! joined. The connection stays on its backend across switches (SPEC §3);
//! once its pool stops taking traffic it gets `drain_timeout` to finish and
//! is then closed (0 = never closed).

use std::sync::Arc;
use std::time::Duration;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::sync::watch;

use crate::color::Color;
use crate::data_plane::backend::InFlight;
use crate::data_plane::h1client::Upgraded;
use crate::data_plane::snap_ref::Downstream;

/// What an upgraded connection watches to know when to drain.
pub(crate) struct Watch {
    /// Ticks whenever the table is swapped.
    pub(crate) changes: watch::Receiver<()>,
    /// The service it belongs to.
    pub(crate) service: Arc<str>,
    /// The pool it was routed to.
    pub(crate) color: Color,
    /// Grace after its pool stops taking traffic; 0 = never close.
    pub(crate) drain_timeout: Duration,
    /// The client connection and its proxy (the routing table, and
    /// `switchyard_upgrades_drained_total`): keeps shutdown waiting, and
    /// keeps the connection counted (open-connections gauge, connection
    /// limits), while the upgraded stream lives.
    pub(crate) conn: Arc<Downstream>,
}

impl Watch {
    /// Does its pool still take traffic in the current table?
    fn pool_is_live(&self) -> bool {
        let snap = self.conn.proxy.table().load();
        snap.route(&self.service)
            .is_some_and(|r| r.weights.takes_traffic(self.color))
    }
}

/// Joins the client's and the backend's upgraded streams in a task.
pub(crate) fn bridge(
    client: OnUpgrade,
    mut upstream: Upgraded,
    in_flight: InFlight,
    mut watch: Watch,
) {
    tokio::spawn(async move {
        let client = match client.await {
            Ok(client) => client,
            Err(e) => {
                tracing::debug!(error = %e, "upgrade failed");
                return;
            }
        };
        let mut client = TokioIo::new(client);
        let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
        tokio::pin!(copy);
        // Armed once the pool stops taking traffic.
        let deadline = tokio::time::sleep(Duration::MAX / 4);
        tokio::pin!(deadline);
        let mut armed = false;
        // Only a change from taking traffic to not arms the drain: a tester's
        // preview connection to the idle pool is left alone until then.
        let mut was_live = watch.pool_is_live();
        loop {
            tokio::select! {
                res = &mut copy => {
                    if let Err(e) = res {
                        tracing::debug!(error = %e, "upgraded connection ended with an error");
                    }
                    return;
                }
                changed = watch.changes.changed(), if !armed && !watch.drain_timeout.is_zero() => {
                    if changed.is_err() {
                        // The control plane is gone: we are shutting down.
                        armed = true;
                        deadline.as_mut().reset(tokio::time::Instant::now() + watch.drain_timeout);
                    } else {
                        let live = watch.pool_is_live();
                        if (was_live && !live) || in_flight.backend().is_retired() {
                            armed = true;
                            deadline.as_mut().reset(tokio::time::Instant::now() + watch.drain_timeout);
                        }
                        was_live = live;
                    }
                }
                () = &mut deadline, if armed => {
                    watch.conn.proxy.metrics().upgrades_drained.inc();
                    tracing::info!(
                        service = %watch.service,
                        pool = %watch.color,
                        "closing upgraded connection: its pool stopped taking traffic {:?} ago",
                        watch.drain_timeout
                    );
                    return;
                }
            }
        }
    });
}
