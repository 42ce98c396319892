//! ferry end-to-end suite: one test binary, real Postgres, sshd, S3 server,
//! RabbitMQ and the real `ferry-coordinator`, `ferry-agent` and `ferryctl` binaries.
//! Build the binaries first: `cargo build --workspace --bins` (deploy/test.sh does).

mod admin_api;
mod agent_bounds;
mod agent_faults;
mod agent_identity;
mod amqp_tls;
mod announcements;
mod architecture;
mod baseline;
mod ctl;
mod db_outage;
mod discovery;
mod events;
mod flow;
mod ha;
mod harness_smoke;
mod health;
mod hostile_sftp;
mod keys;
mod metrics;
mod post_actions;
mod remote_site;
mod retention;
mod secrets;
mod security;
mod slow_agents;
mod stack;
mod stored_truth;
mod transfer;
mod trust;
