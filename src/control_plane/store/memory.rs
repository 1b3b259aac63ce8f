//! An in-memory store with the shared store's semantics (a revision per
//! service, compare-and-swap), for unit tests of the write path.

use std::collections::HashMap;
use std::sync::Mutex;

use super::{Change, Incoming, Rev, StateStore, StoreError, StoreFuture};
use crate::control_plane::state::{RoutingState, ServiceState};

/// The last revision given, and each service with its revision.
type Held = (Rev, HashMap<String, (ServiceState, Rev)>);

/// Services by name with their revision; one global revision counter, as
/// etcd has.
#[derive(Default)]
pub(crate) struct MemoryStore {
    inner: Mutex<Held>,
}

impl MemoryStore {
    /// What the store holds for `service`.
    pub(crate) fn get(&self, service: &str) -> Option<(ServiceState, Rev)> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.1.get(service).cloned()
    }

    /// Another writer's change: stores `state` at a new revision.
    pub(crate) fn put(&self, service: &str, state: ServiceState) -> Rev {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.0 += 1;
        let rev = inner.0;
        inner.1.insert(service.to_owned(), (state, rev));
        rev
    }
}

impl StateStore for MemoryStore {
    fn save<'a>(
        &'a self,
        state: &'a RoutingState,
        changes: &'a [Change],
    ) -> StoreFuture<'a, Vec<Rev>> {
        Box::pin(async move {
            let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            for c in changes {
                let now = inner.1.get(&c.service).map_or(0, |(_, r)| *r);
                if now != c.base {
                    return Err(StoreError::Conflict {
                        service: c.service.clone(),
                    });
                }
            }
            inner.0 += 1;
            let rev = inner.0;
            for c in changes {
                match state.services.get(&c.service) {
                    Some(s) => {
                        inner.1.insert(c.service.clone(), (s.clone(), rev));
                    }
                    None => {
                        inner.1.remove(&c.service);
                    }
                }
            }
            Ok(vec![rev; changes.len()])
        })
    }

    fn fetch<'a>(&'a self, service: &'a str) -> StoreFuture<'a, Option<Incoming>> {
        Box::pin(async move {
            Ok(self.get(service).map(|(s, rev)| Incoming {
                service: service.to_owned(),
                value: Some(Ok(s)),
                rev,
            }))
        })
    }
}
