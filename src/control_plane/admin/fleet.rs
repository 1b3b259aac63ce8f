//! Fleet-mode admin calls (SPEC §11): `/readyz` with the sync state,
//! `GET /api/v1/replicas`, and `POST /api/v1/state/import` (what
//! `ctl state import --from FILE` sends).

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::StatusCode;
use serde_json::json;

use super::{json_response, AdminError, AdminResponse};
use crate::control_plane::control::{Control, ControlError, Readiness};
use crate::control_plane::store::decode_file;

/// A state file sent for import may be larger than a mutation body.
pub(super) const MAX_IMPORT_BYTES: usize = 16 * 1024 * 1024;

/// A replica whose presence key was not rewritten for this long is shown
/// stale even if it says it is synced.
const PRESENCE_STALE: Duration = Duration::from_secs(10);

/// `/readyz` in fleet mode: 200 with `{"state":"synced"}` or
/// `{"state":"stale",…}` (the last table keeps serving: an etcd outage must
/// not make every replica unready), 503 `{"state":"starting"}` while there
/// is no table.
pub(super) fn readyz(r: Readiness, running: bool) -> AdminResponse {
    let (status, body) = match r {
        _ if !running => (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"state": "shutting_down"}),
        ),
        Readiness::Starting => (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"state": "starting", "message": "waiting for etcd (no cache file)"}),
        ),
        Readiness::Stale(silence) => {
            let since = SystemTime::now()
                .checked_sub(silence)
                .map(|t| humantime::format_rfc3339_seconds(t).to_string());
            (
                StatusCode::OK,
                json!({"state": "stale", "since": since, "staleness_seconds": silence.as_secs_f64()}),
            )
        }
        Readiness::Synced | Readiness::Ready => (StatusCode::OK, json!({"state": "synced"})),
    };
    json_response(status, &body)
}

/// `GET /api/v1/replicas`: every live replica of the cluster, the
/// generation it serves per service, and `synced`, `lagging` (a service
/// behind the newest generation any replica serves) or `stale` (cut off
/// from etcd, or its presence not rewritten lately).
pub(super) async fn replicas(control: &Control) -> Result<AdminResponse, AdminError> {
    let store = control.fleet().ok_or(AdminError::NotFleet)?;
    let list = store
        .replicas()
        .await
        .map_err(|e| AdminError::Control(ControlError::Persist(e)))?;
    let mut newest: BTreeMap<String, u64> = BTreeMap::new();
    for v in control.views() {
        newest.insert(v.name, v.generation);
    }
    for p in &list {
        for (name, g) in &p.services {
            let e = newest.entry(name.clone()).or_insert(0);
            *e = (*e).max(*g);
        }
    }
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let replicas: Vec<_> = list
        .iter()
        .map(|p| {
            let old = now.saturating_sub(p.updated_at) > PRESENCE_STALE.as_secs();
            let services: BTreeMap<_, _> = newest
                .iter()
                .map(|(name, top)| {
                    let served = p.services.get(name).copied();
                    let state = match served {
                        _ if p.stale || old => "stale",
                        Some(g) if g >= *top => "synced",
                        _ => "lagging",
                    };
                    (name.as_str(), json!({"generation": served, "state": state}))
                })
                .collect();
            let state = if p.stale || old {
                "stale"
            } else if services.values().all(|s| s["state"] == "synced") {
                "synced"
            } else {
                "lagging"
            };
            json!({
                "id": p.id,
                "admin": p.admin,
                "version": p.version,
                "started_at": p.started_at,
                "state": state,
                "staleness_seconds": p.staleness_seconds,
                "updated_at": p.updated_at,
                "services": services,
            })
        })
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "replica": store.replica_id(),
            "services": newest,
            "replicas": replicas,
        }),
    ))
}

/// `POST /api/v1/state/import`: a single-replica state file (the body)
/// into etcd, service by service: generations and history are kept; a
/// service etcd holds at the same or a newer generation is left alone and
/// reported.
pub(super) async fn import(control: &Control, body: &Bytes) -> Result<AdminResponse, AdminError> {
    let store = control.fleet().ok_or(AdminError::NotFleet)?;
    let state = decode_file(body).map_err(|m| AdminError::InvalidField {
        field: "state",
        message: format!("not a switchyard state file: {m}"),
    })?;
    let mut imported = Vec::new();
    let mut skipped = Vec::new();
    for (name, svc) in &state.services {
        let created = store
            .import(name, svc)
            .await
            .map_err(|e| AdminError::Control(ControlError::Persist(e)))?;
        let entry = json!({"service": name, "generation": svc.generation});
        if created {
            imported.push(entry);
        } else {
            skipped.push(entry);
        }
    }
    Ok(json_response(
        StatusCode::OK,
        &json!({"imported": imported, "already_in_etcd": skipped}),
    ))
}
