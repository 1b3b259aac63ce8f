//! switchyard: a Layer-7 reverse proxy for blue/green and canary releases.
//!
//! # Architecture
//!
//! ```text
//!  cli ─▶ app (wiring) ─┬─▶ control_plane ──────────────── publishes ───┐
//!                       │   admin API / SIGHUP → Command                  │
//!                       │   → state::apply (pure) → store::save           │ ArcSwap::store
//!                       │   → side effects (health checkers, series)      ▼
//!                       └─▶ data_plane: server → conn → proxy ─▶ routing::Snapshot
//!                                                  └─▶ upstream → backend
//!  shared by both: config, color, weights, metrics
//! ```
//!
//! One rule holds the tree together: **`data_plane` never imports
//! `control_plane`** (`tests/layout.rs` fails the build otherwise). The
//! control plane builds a routing [`data_plane::routing::Snapshot`] and
//! stores it; the data plane loads it once per request and knows nothing
//! of how it was made.
//!
//! # The request path, in the order a request meets it
//!
//! 1. [`data_plane::server`]: accept (connection limits of
//!    [`data_plane::conn_limit`]), tell HTTP/1.1 from h2c (or ALPN after
//!    TLS), run the hyper connection beside the connection timer of
//!    `data_plane::conn` (header-read and idle timeouts, parking).
//! 2. `data_plane::proxy`: `Proxy::handle` loads the snapshot once and is
//!    the one place an error becomes a response; `forward` reads top to
//!    bottom: framing checks, host, service, pool, head rewrite, upstream;
//!    a service with a mirror also hands a copy to `data_plane::mirror`
//!    (detached, never waited for).
//! 3. [`data_plane::routing`]: service (host, then longest prefix), pool
//!    (preview header, targeting rules, sticky bucket, weights), backend
//!    (balance, failover).
//! 4. `data_plane::upstream`: the attempt loop (retries under a budget,
//!    checkout from [`data_plane::backend`], ejection, failover accounting);
//!    the exchange itself is the proxy's own HTTP/1.1 client,
//!    `data_plane::h1client`, driven by the request's task.
//! 5. [`data_plane::exchange`]: the response body streams back; when it ends,
//!    metrics, access log and the pooled connection are settled.
//!
//! # Where things are
//!
//! - [`cli`]: argument parsing, `check`, `run`, `demo`, `ctl`.
//! - `config`: TOML → validated `config::Config`, every error with its line.
//! - `control_plane`: state and its pure `apply`, `store`, `control`
//!   (apply → persist → publish; reload), `admin` (API, auth).
//! - `data_plane`: listeners, connections, proxy, upstream, routing,
//!   backends, health, TLS, the HTTP/1 framing guard.
//! - `app`: startup and shutdown wiring of the two planes.

// Input from outside never reaches an unwrap (tests may unwrap freely).
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]
#![warn(unreachable_pub)]
// The docs are for the people working on switchyard (CI builds them with
// `--document-private-items`), so they link freely to crate-private items.
#![allow(rustdoc::private_intra_doc_links)]

pub(crate) mod app;
pub mod cli;
pub(crate) mod color;
pub(crate) mod config;
pub(crate) mod control_plane;
pub(crate) mod data_plane;
pub(crate) mod metrics;
pub(crate) mod weights;

#[doc(hidden)]
pub mod testing;
