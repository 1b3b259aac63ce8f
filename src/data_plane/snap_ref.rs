//! What a connection's requests share, held by handles whose reference
//! counts only the connection's own worker thread touches.
//!
//! A request keeps the routing snapshot it was routed on, the proxy and its
//! client connection until its exchange ends. Held as plain `Arc`s of the
//! shared values, that was eight atomic read-modify-writes per request on
//! reference counts that every worker thread writes: the snapshot's
//! (`load_full`, the streamed body's clone, both drops), the matched
//! service's and the proxy's. Each moves the count's cache line between
//! cores; under load `perf` put those `lock` instructions among the
//! hottest of the request path, and the service's count shares a line with
//! fields every request reads. Here they are an `Arc` per connection
//! around the shared one: one shared increment per connection (and per
//! snapshot change seen on it), not per request.

use std::cell::RefCell;
use std::ops::Deref;
use std::sync::Arc;

use arc_swap::{ArcSwap, Guard};

use crate::data_plane::conn::ClientInfo;
use crate::data_plane::proxy::Proxy;
use crate::data_plane::routing::Snapshot;

/// A routing snapshot, held by a request (see the module doc).
#[derive(Clone)]
pub(crate) struct SnapRef(Arc<Held>);

/// One connection's hold on one snapshot: the allocation whose count the
/// connection's requests share (a second `Arc` around the shared one, on
/// purpose).
struct Held(Arc<Snapshot>);

impl Deref for SnapRef {
    type Target = Snapshot;

    fn deref(&self) -> &Snapshot {
        &self.0 .0
    }
}

impl SnapRef {
    fn new(snap: Arc<Snapshot>) -> SnapRef {
        SnapRef(Arc::new(Held(snap)))
    }
}

/// A connection's last [`SnapRef`], reused while the table still holds
/// that snapshot. It lives in the connection's service: an HTTP/1
/// connection's is dropped when it parks, so an idle client pins no old
/// snapshot; an HTTP/2 connection holds at most one until its next
/// request or its end. A clone starts empty.
#[derive(Default)]
pub(crate) struct SnapCache(RefCell<Option<SnapRef>>);

impl Clone for SnapCache {
    fn clone(&self) -> SnapCache {
        SnapCache::default()
    }
}

impl SnapCache {
    /// The table's current snapshot: one `ArcSwap` load, which does not
    /// touch the snapshot's count; a new handle only when the snapshot
    /// changed since this connection's last request. A switch that lands
    /// after this load is seen by the next request, as with `load_full`.
    pub(crate) fn load(&self, table: &ArcSwap<Snapshot>) -> SnapRef {
        let current = table.load();
        let Ok(mut cached) = self.0.try_borrow_mut() else {
            return SnapRef::new(Guard::into_inner(current));
        };
        match &*cached {
            Some(s) if Arc::ptr_eq(&s.0 .0, &current) => s.clone(),
            _ => {
                let fresh = SnapRef::new(Guard::into_inner(current));
                *cached = Some(fresh.clone());
                fresh
            }
        }
    }
}

/// The client connection a request came on, with the proxy serving it:
/// made once per connection, cloned per request (see the module doc).
pub(crate) struct Downstream {
    /// The proxy (shared by all connections and workers).
    pub(crate) proxy: Arc<Proxy>,
    /// The client.
    pub(crate) client: ClientInfo,
}
