//! The ferry domain: file statuses and their transition table, the AMQP
//! announcement, post-actions, roles, validation of admin input and of
//! agents' discoveries, object key templates, the stable-file rule and backoff. Pure: no IO, no async runtime, no protocol or database types.
//!
//! **Architecture invariant:** this crate depends on no tokio, tonic, prost or
//! sqlx (checked by `tests/e2e/architecture.rs`).

pub mod announcement;
pub mod backoff;
pub mod discovery;
pub mod domain;
pub mod keys;
pub mod lifecycle;
pub mod overlap;
pub mod stability;
pub mod sync;
pub mod validate;

/// Version of this build, sent in the agent's hello and shown by `--version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
