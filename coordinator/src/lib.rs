//! ferry coordinator: owns the Postgres schema, the server registry, file
//! state, task assignment and AMQP notifications. See ARCHITECTURE.md.
#![forbid(unsafe_code)]

pub mod admin;
pub mod agents;
pub mod auth;
pub mod config;
pub mod convert;
pub mod db;
pub mod discovery;
pub mod error;
pub mod files;
pub mod hostkey;
pub mod polls;
pub mod post_actions;
pub mod registry;
pub mod relay;
pub mod results;
pub mod scheduler;
pub mod secrets;
pub mod server;
pub mod state;
pub mod tasks;
