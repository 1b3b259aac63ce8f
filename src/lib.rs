//! switchyard: a Layer-7 reverse proxy for blue/green and canary releases.
//!
//! # Architecture
//!
//! ```text
//!                 ┌──────────── control plane (admin API, SIGHUP) ─────────────┐
//!                 │ Command → state::apply (pure) → StateStore::save → Snapshot │
//!                 └───────────────────────────────┬──────────────────────────────┘
//!                                                 │ ArcSwap::store
//! client ─▶ server (accept, detect h1/h2, timeouts) ─▶ proxy::handle ─▶ backend
//!                                  one ArcSwap load per request ┘
//! ```
//!
//! # The request path
//!
//! 1. [`server`] accepts, tells HTTP/1.1 from h2c (or reads ALPN after TLS),
//!    and runs the hyper connection beside a timer enforcing
//!    `header_read_timeout` and `idle_timeout`.
//! 2. [`proxy::Proxy::handle`] loads the [`routing::Snapshot`] once; the
//!    request lives on that snapshot until its response body ends.
//! 3. [`routing`] matches the service (host, then longest path prefix),
//!    chooses the pool (preview header, sticky bucket, weights) and the
//!    backend (round robin or least request over available backends,
//!    failover to the other pool).
//! 4. [`headers`] rewrites the head (hop-by-hop, `X-Forwarded-*`,
//!    `x-request-id`); [`backend`] lends a pooled upstream connection.
//! 5. The response streams back through [`exchange::ProxyBody`], which
//!    settles metrics, the access log and the pooled connection when the
//!    body ends.
//!
//! # Modules
//!
//! - [`config`]: TOML → validated [`config::Config`], every error with its line.
//! - [`state`]: routing state and the pure [`state::apply`].
//! - [`store`]: durable state file (write, fsync, rename).
//! - [`control`]: apply → persist → publish; reload.
//! - [`admin`]: the admin HTTP API and `/metrics`.
//! - [`health`]: active checks and passive ejection.
//! - [`tls`]: rustls server (SNI, reload) and upstream TLS.
//! - [`h1guard`]: strict HTTP/1 request framing (smuggling defence).
//! - [`app`]: startup and shutdown wiring.

// Input from outside never reaches an unwrap (tests may unwrap freely).
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]
#![warn(missing_docs)]

pub mod admin;
pub mod app;
pub mod auth;
pub mod backend;
pub mod color;
pub mod config;
pub mod control;
pub mod ctl;
pub mod demo;
pub mod error;
pub mod exchange;
pub mod h1guard;
pub mod headers;
pub mod health;
pub mod metrics;
pub mod proxy;
pub mod routing;
pub mod server;
pub mod state;
pub mod store;
pub mod tls;
pub mod upgrade;
pub mod workers;
