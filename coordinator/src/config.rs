//! Command line of `ferry-coordinator`: every flag is also an environment variable.
//!
//! **Invariant:** flags that can hold a secret (URLs with passwords) are
//! `hide_env_values`, so `--help` never echoes them.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use ferry_proto::telemetry::LogFormat;

/// ferry coordinator: server registry, file state, task assignment and AMQP notifications.
#[derive(Debug, Parser)]
#[command(name = "ferry-coordinator", version = ferry_common::VERSION)]
pub(crate) struct Cli {
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
pub(crate) enum Command {
    /// Apply migrations and serve the admin and agent APIs.
    Serve(Box<ServeArgs>),
    /// Apply database migrations and exit.
    Migrate(DatabaseArgs),
}

#[derive(Debug, Clone, Args)]
pub(crate) struct DatabaseArgs {
    /// Postgres URL, e.g. postgres://ferry@127.0.0.1:5432/ferry. It may hold a
    /// password: `--help` never shows the variable's value.
    #[arg(long, env = "FERRY_DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// Maximum Postgres connections of this process.
    #[arg(long, env = "FERRY_DATABASE_MAX_CONNECTIONS", default_value_t = 16)]
    pub database_max_connections: u32,
}

#[derive(Debug, Clone, Args)]
pub(crate) struct ServeArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Address of the gRPC listener (mTLS). Port 0 picks a free port; the bound
    /// address is printed on stdout as `ferry-coordinator listening on ADDR`.
    #[arg(long, env = "FERRY_LISTEN", default_value = "0.0.0.0:7443")]
    pub listen: SocketAddr,
    /// Plain-HTTP address for `/healthz` (alive) and `/readyz` (Postgres
    /// reachable, not shutting down), for load balancers and orchestrators;
    /// unset: off. Printed as `ferry-coordinator http on ADDR`.
    #[arg(long, env = "FERRY_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
    /// Seconds between SIGTERM and closing the gRPC listener. Meanwhile
    /// `/readyz` answers 503 and gRPC health NOT_SERVING while everything
    /// keeps running, so a balancer takes the coordinator out of rotation
    /// before its connections close (keep it above the time the balancer
    /// takes to mark a server down).
    #[arg(long, env = "FERRY_DRAIN_DELAY_SECS", default_value_t = 10)]
    pub drain_delay_secs: u64,
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
    /// Lease of a transfer task, seconds; renewed by the agent's progress reports.
    /// A task whose lease expires (agent died) is requeued.
    #[arg(long, env = "FERRY_TASK_LEASE_SECS", default_value_t = 60)]
    pub task_lease_secs: u64,
    /// Messages queued for one agent stream before the agent counts as not
    /// reading it and is disconnected (so one stuck agent never blocks the
    /// loops serving the others).
    #[arg(long, env = "FERRY_AGENT_SEND_QUEUE", default_value_t = 1024)]
    pub agent_send_queue: usize,
    /// Prune processed versions gone from their server (with their history
    /// and announcements), history of other processed versions, and published
    /// announcements once older than this many days; 0 keeps everything.
    #[arg(long, env = "FERRY_RETENTION_DAYS", default_value_t = 30)]
    pub retention_days: u64,
    /// Seconds between retention passes.
    #[arg(long, env = "FERRY_RETENTION_INTERVAL_SECS", default_value_t = 3600)]
    pub retention_interval_secs: u64,
    /// Transfer attempts before a file becomes `failed`.
    #[arg(long, env = "FERRY_MAX_ATTEMPTS", default_value_t = 5)]
    pub max_attempts: u32,
    /// First retry delay, seconds; doubles per attempt (with jitter) up to --retry-max-secs.
    #[arg(long, env = "FERRY_RETRY_BASE_SECS", default_value_t = 10)]
    pub retry_base_secs: u64,
    /// Longest retry delay, seconds.
    #[arg(long, env = "FERRY_RETRY_MAX_SECS", default_value_t = 3600)]
    pub retry_max_secs: u64,
    /// AMQP broker URL (amqp://user:pass@host:5672/%2f, or amqps:// for TLS,
    /// see FERRY_AMQP_CA). Without it nothing is
    /// announced and stored files stay `uploaded`. `--help` never shows the
    /// variable's value (it holds a password).
    #[arg(long, env = "FERRY_AMQP_URL", hide_env_values = true)]
    pub amqp_url: Option<String>,
    /// CA certificates (PEM) an `amqps://` broker's certificate must chain to;
    /// unset: the system roots. Only with an `amqps://` URL.
    #[arg(long, env = "FERRY_AMQP_CA")]
    pub amqp_ca: Option<PathBuf>,
    /// Client certificate (PEM, with its chain) for an `amqps://` broker that
    /// asks for one; needs FERRY_AMQP_KEY.
    #[arg(long, env = "FERRY_AMQP_CERT")]
    pub amqp_cert: Option<PathBuf>,
    /// Private key (PEM) of FERRY_AMQP_CERT.
    #[arg(long, env = "FERRY_AMQP_KEY")]
    pub amqp_key: Option<PathBuf>,
    /// Durable topic exchange the notifications go to (declared if missing).
    #[arg(long, env = "FERRY_AMQP_EXCHANGE", default_value = "ferry")]
    pub amqp_exchange: String,
    /// Routing key template of stored files; `{server}` becomes the server's
    /// name with `%`, `.`, `*`, `#` escaped as `%25`, `%2E`, `%2A`, `%23` (one
    /// topic word), `{event}` becomes `stored`.
    #[arg(
        long,
        env = "FERRY_AMQP_ROUTING_KEY",
        default_value = "ferry.file.{server}"
    )]
    pub amqp_routing_key: String,
    /// Announce files that end `failed` or `lost` (type `ferry.file.failed` /
    /// `ferry.file.lost`), so consumers can alert on them.
    #[arg(
        long,
        env = "FERRY_ANNOUNCE_FAILURES",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    pub announce_failures: bool,
    /// Routing key template of failure announcements; `{event}` becomes
    /// `failed` or `lost`, `{server}` the escaped server name.
    #[arg(
        long,
        env = "FERRY_AMQP_FAILURE_ROUTING_KEY",
        default_value = "ferry.file.{event}.{server}"
    )]
    pub amqp_failure_routing_key: String,
    /// Outbox rows published per transaction by the AMQP relay.
    #[arg(long, env = "FERRY_AMQP_BATCH", default_value_t = 100)]
    pub amqp_batch: i64,
    /// Times the broker may refuse (NACK, or return as unroutable) one
    /// announcement before it is parked until an admin retries the file;
    /// refused announcements are retried with backoff up to 5 minutes apart.
    #[arg(long, env = "FERRY_AMQP_MAX_ATTEMPTS", default_value_t = 50)]
    pub amqp_max_attempts: u32,
}
