//! The control plane: the routing state, the one pure function that changes
//! it ([`state::apply`]), where it is kept ([`store`]), the loop that
//! applies, persists and publishes ([`control`]), and the admin API
//! ([`admin`]) that drives it.

pub(crate) mod admin;
pub(crate) mod control;
pub(crate) mod files;
pub(crate) mod rollout;
pub(crate) mod state;
pub(crate) mod store;
