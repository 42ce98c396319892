//! The ferry end-to-end harness: starts real components for each test — a
//! Postgres database, a PKI, OpenSSH sshd, an S3 server (s3s-fs), a RabbitMQ
//! exchange and queue (or a test-owned RabbitMQ node), HAProxy, and the real
//! `ferry-coordinator` / `ferryctl` binaries — on loopback ports, so tests run
//! in parallel without sharing state.
//!
//! [`LyingSftp`] is the exception: a scripted hostile SFTP server that runs
//! inside the test process.
//!
//! Prerequisites (installed/started by `deploy/test-deps.sh`, run as root):
//! sshd, s3s-fs, Postgres on :5432, RabbitMQ on :5672, user `ferrytest`.
//! The binaries come from `cargo build --workspace --bins`.
//!
//! Constructors panic with a message naming what failed and where its log is;
//! temp dirs of a failing test are kept (their paths are printed).
#![forbid(unsafe_code)]

pub mod agent;
pub mod amqp;
pub mod certs;
pub mod cluster;
pub mod coordinator;
pub mod cpu;
pub mod ctl;
pub mod haproxy;
pub mod lying_sftp;
pub mod netns;
pub mod pg_cluster;
pub mod postgres;
pub mod proxy;
pub mod rabbit_node;
pub mod rogue;
pub mod s3;
pub mod sshd;
pub mod util;

pub use agent::{Agent, AgentOptions, eventually};
pub use amqp::{AmqpMessage, AmqpQueue, amqp_url, unique_exchange};
pub use certs::{CertFiles, TestPki};
pub use cluster::{Cluster, ClusterOptions, Tally};
pub use coordinator::Coordinator;
pub use cpu::CpuSnapshot;
pub use ctl::{Ctl, CtlOutput};
pub use haproxy::HaProxy;
pub use lying_sftp::{LyingSftp, LyingSftpBuilder, PathCounts};
pub use netns::Site;
pub use pg_cluster::PgCluster;
pub use postgres::TestDb;
pub use proxy::TcpProxy;
pub use rabbit_node::RabbitNode;
pub use rogue::RogueAgent;
pub use s3::S3Server;
pub use sshd::{HostKey, Sshd};
pub use util::{
    ChildGuard, LogDir, bin_path, free_port, random_hex, signal, wait_for_port, workspace_root,
};

/// Installs the process-wide rustls crypto provider (aws-lc-rs); idempotent.
pub fn init() {
    ferry_proto::tls::install_crypto_provider();
}
