//! Command line of `ferry-coordinator`: every flag is also an environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use ferry_common::telemetry::LogFormat;

/// ferry coordinator: server registry, file state, task assignment and AMQP notifications.
#[derive(Debug, Parser)]
#[command(name = "ferry-coordinator", version = ferry_common::VERSION)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(
        long,
        env = "FERRY_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply migrations and serve the admin and agent APIs.
    Serve(ServeArgs),
    /// Apply database migrations and exit.
    Migrate(DatabaseArgs),
}

#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// Postgres URL, e.g. postgres://ferry@127.0.0.1:5432/ferry.
    #[arg(long, env = "FERRY_DATABASE_URL")]
    pub database_url: String,
    /// Maximum Postgres connections of this process.
    #[arg(long, env = "FERRY_DATABASE_MAX_CONNECTIONS", default_value_t = 16)]
    pub database_max_connections: u32,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Address of the gRPC listener (mTLS). Port 0 picks a free port; the bound
    /// address is printed on stdout as `ferry-coordinator listening on ADDR`.
    #[arg(long, env = "FERRY_LISTEN", default_value = "0.0.0.0:7443")]
    pub listen: SocketAddr,
    /// CA certificate (PEM) that client certificates must chain to.
    #[arg(long, env = "FERRY_TLS_CA")]
    pub tls_ca: PathBuf,
    /// This coordinator's server certificate (PEM).
    #[arg(long, env = "FERRY_TLS_CERT")]
    pub tls_cert: PathBuf,
    /// Private key of the server certificate (PEM).
    #[arg(long, env = "FERRY_TLS_KEY")]
    pub tls_key: PathBuf,
    /// File holding the 256-bit key that encrypts SFTP credentials at rest
    /// (64 hex characters, base64, or 32 raw bytes), e.g. `openssl rand -hex 32`.
    #[arg(long, env = "FERRY_SECRET_KEY_FILE")]
    pub secret_key_file: PathBuf,
    /// Identity of this instance in leases and agent records (default: host name and pid).
    #[arg(long, env = "FERRY_COORDINATOR_ID")]
    pub coordinator_id: Option<String>,
}
