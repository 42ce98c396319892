//! Command line of `ferry-agent`: every flag is also an environment variable.
//! S3 settings are the standard `AWS_*` variables, read by the AWS SDK.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use ferry_proto::telemetry::LogFormat;

use crate::sftp::Timeouts;

/// ferry agent: polls the SFTP servers a coordinator assigns and streams files to S3.
#[derive(Debug, Clone, Parser)]
#[command(name = "ferry-agent", version = ferry_common::VERSION)]
pub(crate) struct AgentConfig {
    /// Coordinator endpoints, comma-separated (https://host:port), tried in turn.
    #[arg(
        long,
        env = "FERRY_COORDINATORS",
        value_delimiter = ',',
        required = true
    )]
    pub coordinators: Vec<String>,
    /// CA certificate (PEM) the coordinators' certificates chain to.
    #[arg(long, env = "FERRY_TLS_CA")]
    pub tls_ca: PathBuf,
    /// This agent's client certificate (PEM); its SAN URI
    /// spiffe://ferry/agent/<site>/<name> is its identity (site and name).
    #[arg(long, env = "FERRY_TLS_CERT")]
    pub tls_cert: PathBuf,
    /// Private key of the client certificate (PEM).
    #[arg(long, env = "FERRY_TLS_KEY")]
    pub tls_key: PathBuf,
    /// Optional consistency check: the site this agent serves comes from its
    /// certificate (`spiffe://ferry/agent/<site>/<name>`); when set and
    /// different, the coordinator refuses the stream naming both. Unset: the
    /// certificate's site.
    #[arg(long, env = "FERRY_SITE")]
    pub site: Option<String>,
    /// Concurrent transfers this agent accepts.
    #[arg(long, env = "FERRY_CAPACITY", default_value_t = 4)]
    pub capacity: u32,
    /// SFTP connect timeout (TCP + SSH handshake + login), seconds.
    #[arg(long, env = "FERRY_SFTP_CONNECT_TIMEOUT", default_value_t = 10)]
    pub sftp_connect_timeout: u64,
    /// SFTP per-request timeout, seconds.
    #[arg(long, env = "FERRY_SFTP_REQUEST_TIMEOUT", default_value_t = 30)]
    pub sftp_request_timeout: u64,
    /// Close an SSH connection that saw no traffic for this long, seconds.
    #[arg(long, env = "FERRY_SFTP_IDLE_TIMEOUT", default_value_t = 300)]
    pub sftp_idle_timeout: u64,
    /// On SIGTERM, how long to let running transfers finish (seconds) before
    /// exiting; unfinished ones are requeued by the coordinator when their lease ends.
    #[arg(long, env = "FERRY_DRAIN_TIMEOUT", default_value_t = 60)]
    pub drain_timeout: u64,
    /// Resend every stable file of the polled watches this often, seconds (a
    /// backstop: the coordinator records each file version once, so this
    /// writes nothing for files it already has).
    #[arg(long, env = "FERRY_DISCOVERY_RESYNC_SECS", default_value_t = 600)]
    pub discovery_resync_secs: u64,
    /// Directory entries one listing of a watch may read (every entry of
    /// every directory, matching or not); a listing past it fails the poll
    /// with an error naming the watch. Bounds the agent's memory and time on
    /// a server whose `READDIR` never ends.
    #[arg(long, env = "FERRY_MAX_LISTING_ENTRIES", default_value_t = crate::sftp::DEFAULT_MAX_ENTRIES)]
    pub max_listing_entries: u64,
    /// Plain-HTTP address for `/healthz` (alive) and `/readyz` (connected to a
    /// coordinator, not shutting down); unset: off.
    #[arg(long, env = "FERRY_HTTP_LISTEN")]
    pub http_listen: Option<std::net::SocketAddr>,
    /// Log format on stderr.
    #[arg(long, env = "FERRY_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

impl AgentConfig {
    pub(crate) fn drain_timeout(&self) -> Duration {
        Duration::from_secs(self.drain_timeout)
    }

    pub(crate) fn poll_settings(&self) -> crate::poller::PollSettings {
        crate::poller::PollSettings {
            resync: Duration::from_secs(self.discovery_resync_secs.max(1)),
            listing: crate::sftp::ListingLimits {
                max_entries: self.max_listing_entries.max(1),
                ..crate::sftp::ListingLimits::default()
            },
        }
    }

    pub(crate) fn sftp_timeouts(&self) -> Timeouts {
        Timeouts {
            connect: Duration::from_secs(self.sftp_connect_timeout.max(1)),
            request: Duration::from_secs(self.sftp_request_timeout.max(1)),
            idle: Duration::from_secs(self.sftp_idle_timeout.max(1)),
            ..Timeouts::default()
        }
    }
}
