//! What the integration tests, property tests and benchmarks reach inside
//! the crate for. Not an API: hidden from the docs, free to change. Each
//! module mirrors the crate module it re-exports from.

#![allow(missing_docs)]

pub mod app {
    pub use crate::app::{start, Running, StartOptions};
}

pub mod admin {
    pub use crate::control_plane::admin::decode_mutation;
}

pub mod backend {
    pub use crate::data_plane::backend::{now_ms, Backend, Health};
}

pub mod color {
    pub use crate::color::Color;
}

pub mod config {
    pub use crate::config::mirror::{MirrorError, MirrorSpec};
    pub use crate::config::rules::RuleSpec;
    pub use crate::config::{
        load, parse, BackendAddr, Balance, Config, FileError, FileErrors, HostPattern,
        PreviewConfig, StickyConfig,
    };
}

pub mod h1guard {
    pub use crate::data_plane::h1guard::{Finding, H1Guard};
}

pub mod headers {
    pub use crate::data_plane::headers::{
        append_forwarded_for, new_request_id, remove_hop_by_hop, X_FORWARDED_FOR,
    };
}

pub mod metrics {
    pub use crate::metrics::Metrics;
}

pub mod mirror {
    pub use crate::data_plane::mirror::{
        Mirror, MirrorStats, OutcomeCounts, PoolOutcomes, LATENCY_BOUNDS_MS,
    };
}

pub mod routing {
    pub use crate::data_plane::routing::{
        choose_pool, pick_backend, Decision, Pool, RequestFacts, Route, Rule, Service, Settings,
        Snapshot,
    };
}

pub mod state {
    pub use crate::control_plane::state::{Command, ServiceState};
    pub use crate::weights::Weights;
}
