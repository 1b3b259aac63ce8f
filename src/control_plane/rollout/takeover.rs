//! Fleet mode: a rollout outlives the replica that drives it (SPEC §11,
//! issue 13 item 8).
//!
//! The rollout record, persisted in the service's etcd key, names its
//! driver replica (`driver`); every replica keeps a presence key on a lease
//! (`store::etcd`). One task per replica ([`watch`]) looks at the running
//! rollouts that no driver runs on this replica:
//!
//! - named driver is this replica (it restarted within its lease): resume;
//! - named driver has no presence key any more (its lease expired: it was
//!   killed, or is cut off from etcd), or none is named: claim it with
//!   [`Command::ClaimRollout`] through `Control::execute`, the ordinary write
//!   path (read from etcd, pure `apply`, compare-and-swap on the key's
//!   revision). Of several replicas claiming at once exactly one wins; the
//!   others decide again on the winner's record and change nothing.
//!
//! The winner spawns the driver from the persisted record: the same id,
//! step and time left in the step. It looks when a presence key is deleted
//! (a watch wakes it), and every `lease_ttl / 2` (1 to 5 s) as well, which
//! covers start-up and deletions missed while etcd was unreachable.
//!
//! A replica that was only cut off keeps its driver task running, but
//! cannot write (etcd is unreachable, and after reconnecting the
//! compare-and-swap fails against the claim); once it has adopted the
//! claim its driver sees another replica named and stops without writing.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::control_plane::control::{Control, Readiness};
use crate::control_plane::state::{ChangeMeta, Command};

/// Starts the task (fleet mode only; it ends with the process).
pub(crate) fn watch(control: &Arc<Control>) {
    let Some(store) = control.fleet().map(Arc::clone) else {
        return;
    };
    let every = (store.lease_ttl() / 2).clamp(Duration::from_secs(1), Duration::from_secs(5));
    let control = Arc::clone(control);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = store.departed().notified() => {}
            }
            look(&control).await;
        }
    });
}

/// One look: resumes or claims what needs a driver here.
async fn look(control: &Arc<Control>) {
    let Some(store) = control.fleet() else {
        return;
    };
    // Only on a view etcd has confirmed: never from the cache file alone,
    // never while cut off (the claim could not be written anyway).
    if control.readiness() != Readiness::Synced {
        return;
    }
    let me = store.replica_id().to_string();
    let orphans: Vec<_> = control
        .active_rollouts()
        .await
        .into_iter()
        .filter(|r| !control.drivers().runs(&r.service, &r.id))
        .collect();
    if orphans.is_empty() {
        return;
    }
    let live = match store.live_replicas().await {
        Ok(live) => live,
        Err(e) => {
            tracing::debug!(error = %e, "cannot list the live replicas; looking again later");
            return;
        }
    };
    for r in orphans {
        let mine = r.driver.as_deref() == Some(me.as_str());
        if !mine && !r.may_take_over(&me, &live) {
            continue;
        }
        let meta = ChangeMeta {
            actor: format!("replica:{me}"),
            reason: Some(format!("rollout {} needs a driver", r.id)),
            at: SystemTime::now(),
            if_match: None,
        };
        let cmd = Command::ClaimRollout {
            id: r.id.clone(),
            from: r.driver.clone(),
            replica: me.clone(),
            live: live.clone(),
        };
        // Read from etcd, decided by `apply`, written by compare-and-swap;
        // for this replica's own rollout, only the read (unchanged).
        if let Err(e) = control.execute(&r.service, cmd, meta).await {
            tracing::warn!(service = %r.service, id = %r.id, error = %e, "cannot claim the rollout; trying again later");
            continue;
        }
        // What etcd has now decides: the claim won, or another replica's.
        let Some(record) = control
            .rollouts(&r.service)
            .await
            .and_then(|list| list.into_iter().rev().find(|x| x.id == r.id))
        else {
            continue;
        };
        if !record.is_active() || record.driver.as_deref() != Some(me.as_str()) {
            tracing::info!(service = %r.service, id = %r.id, driver = ?record.driver,
                "rollout claimed by another replica; not driven here");
            continue;
        }
        let (step, left) = (record.step, record.step_remaining_s().unwrap_or(0.0));
        control
            .metrics()
            .rollout_set(&record.service, record.state.as_str(), record.step);
        if super::spawn(control, record) {
            if mine {
                tracing::info!(service = %r.service, id = %r.id, step, remaining_s = left,
                    "rollout resumed after restart");
            } else {
                tracing::warn!(service = %r.service, id = %r.id, step, remaining_s = left,
                    from = ?r.driver, "rollout taken over: its driver replica is gone");
            }
        }
    }
}
