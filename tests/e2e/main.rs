//! ferry end-to-end suite: one test binary, real Postgres, sshd, S3 server,
//! RabbitMQ and the real `ferry-coordinator`, `ferry-agent` and `ferryctl` binaries.
//! Build the binaries first: `cargo build --workspace --bins` (deploy/test.sh does).

mod admin_api;
mod agent_identity;
mod announcements;
mod architecture;
mod ctl;
mod discovery;
mod harness_smoke;
mod post_actions;
mod remote_site;
mod security;
mod stack;
mod transfer;
mod trust;
