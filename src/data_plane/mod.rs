//! The data plane: everything a client connection and its requests touch.
//!
//! It reads the routing table the control plane publishes
//! ([`routing::Snapshot`], one `ArcSwap` load per request) and never imports
//! from `control_plane` (a test checks this): the control plane drives the
//! data plane, never the reverse.

pub(crate) mod backend;
pub(crate) mod conn;
pub(crate) mod conn_limit;
pub(crate) mod drain;
pub(crate) mod error;
pub(crate) mod exchange;
pub(crate) mod h1client;
pub(crate) mod h1guard;
pub(crate) mod headers;
pub(crate) mod health;
pub(crate) mod mirror;
pub(crate) mod outcomes;
pub(crate) mod proxy;
pub(crate) mod routing;
pub(crate) mod server;
pub(crate) mod snap_ref;
pub(crate) mod tls;
pub(crate) mod upgrade;
pub(crate) mod upstream;
pub(crate) mod workers;
