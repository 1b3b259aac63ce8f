//! Where routing state lives between restarts, and, in fleet mode, how the
//! replicas share it.
//!
//! [`StateStore`] is what the control plane writes through:
//! - [`FileStore`] (`[state] backend = "file"`, the default): one JSON file,
//!   the whole state every time; nobody else writes it.
//! - [`etcd::EtcdStore`] (`backend = "etcd"`, SPEC §11): one key per
//!   service, each written in a transaction that compares the key's
//!   revision with the one the change was made from, so two replicas cannot
//!   both win; what other replicas write arrives as [`etcd::StoreEvent`]s,
//!   which the control plane adopts through the same pure `apply`.
//! - `memory::MemoryStore` (unit tests only): the etcd semantics (revisions,
//!   compare-and-swap) in a map.

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;

use crate::control_plane::state::{RoutingState, ServiceState};

pub(crate) mod etcd;
mod file;
#[cfg(test)]
pub(crate) mod memory;

pub(crate) use file::{decode as decode_file, FileStore};

/// A revision in the store, opaque to the control plane except for order
/// within one service. 0: the store does not have the service.
pub(crate) type Rev = i64;

/// A service this replica changed, and the revision of the stored value
/// the change was made from (0: the store did not have it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Change {
    /// The service.
    pub(crate) service: String,
    /// The revision the change was based on.
    pub(crate) base: Rev,
}

/// A service's value as read from a shared store.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Incoming {
    /// The service.
    pub(crate) service: String,
    /// Its state, or why the stored value is not valid state; `None`: the
    /// key was deleted.
    pub(crate) value: Option<Result<ServiceState, String>>,
    /// The revision of this value.
    pub(crate) rev: Rev,
}

/// A failure to read or write persisted state. The message names the file
/// or the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file exists but cannot be read.
    #[error("state file {path}: cannot read: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The file is not valid state.
    #[error("state file {path} is corrupt: {message}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The new state could not be written; the old file is intact.
    #[error("state file {path}: cannot write: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Another writer changed the service since the change was based on it
    /// (fleet mode); nothing was written.
    #[error("service `{service}` was changed by another replica meanwhile")]
    Conflict {
        /// The service.
        service: String,
    },
    /// A service's state is larger than a fleet value may be (fleet
    /// mode); nothing was written.
    #[error(
        "service `{service}`'s state is {size} bytes, more than the {max} a value in etcd may hold; nothing was written"
    )]
    TooLarge {
        /// The service.
        service: String,
        /// Its encoded size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The shared store cannot be reached (fleet mode). The change may or
    /// may not have been made; the replica learns which from its watch.
    #[error("the state backend is unavailable: {0}")]
    Unavailable(String),
}

/// A boxed future of a store operation (the trait is used as `dyn`).
pub(crate) type StoreFuture<'a, T> =
    Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// Persists routing state. `save` is durable when it returns.
pub(crate) trait StateStore: Send + Sync + 'static {
    /// Stores the services named in `changes` as `state` has them, all or
    /// nothing; a named service absent from `state` is deleted. Returns the
    /// new revision of each, in order. A shared store refuses with
    /// [`StoreError::Conflict`] if one was changed since its `base`.
    fn save<'a>(
        &'a self,
        state: &'a RoutingState,
        changes: &'a [Change],
    ) -> StoreFuture<'a, Vec<Rev>>;

    /// The stored value of one service, to retry a change that lost a
    /// conflict. A store nobody else writes has nothing newer: `None`.
    fn fetch<'a>(&'a self, _service: &'a str) -> StoreFuture<'a, Option<Incoming>> {
        Box::pin(async { Ok(None) })
    }
}
