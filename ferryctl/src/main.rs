//! `ferryctl`: the admin CLI of ferry. A pure gRPC client of the coordinator's
//! `ferry.v1.AdminService` over mTLS (plus `certs`, which works offline and
//! creates a development PKI).
//!
//! This file holds the command-line definition and the dispatch; each command
//! family lives in `commands/`, connection setup in `connect`, presentation in
//! `output`. Exit status: 0 on success, 1 on errors (gRPC, connection, files),
//! 2 on usage errors.
#![forbid(unsafe_code)]

mod certs;
mod commands;
mod connect;
mod output;

use std::fmt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::str::FromStr;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use ferry_common::domain::{FileStatus, PostAction};
use ferry_proto::{DrainAgentRequest, RevokeAgentRequest};

use crate::connect::Admin;

/// Admin CLI for ferry (SFTP -> S3 file mover).
#[derive(Debug, Parser)]
#[command(name = "ferryctl", version = ferry_common::VERSION, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

const GLOBAL: &str = "Global options";

/// Options shared by every command.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Coordinator admin endpoint, `https://host:port` (`host:port` implies https).
    #[arg(
        long,
        global = true,
        help_heading = GLOBAL,
        env = "FERRY_ENDPOINT",
        default_value = "https://127.0.0.1:7443"
    )]
    pub endpoint: String,
    /// CA certificate (PEM) that signed the coordinator's certificate.
    #[arg(long, global = true, help_heading = GLOBAL, env = "FERRY_TLS_CA", value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Admin client certificate (PEM, SAN `spiffe://ferry/admin/<name>`).
    #[arg(long, global = true, help_heading = GLOBAL, env = "FERRY_TLS_CERT", value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// Private key (PEM) of the admin client certificate.
    #[arg(long, global = true, help_heading = GLOBAL, env = "FERRY_TLS_KEY", value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// Print JSON (snake_case fields, RFC 3339 times) instead of tables, for scripts.
    #[arg(
        long,
        global = true,
        help_heading = GLOBAL,
        env = "FERRY_JSON",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub json: bool,
    /// Seconds to wait for the connection and for each request.
    #[arg(
        long,
        global = true,
        help_heading = GLOBAL,
        env = "FERRY_TIMEOUT",
        value_name = "SECS",
        default_value_t = 30,
        value_parser = clap::value_parser!(u64).range(1..=86_400)
    )]
    pub timeout: u64,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a development CA and issue coordinator/agent/admin certificates (offline).
    #[command(subcommand)]
    Certs(CertsCmd),
    /// Register and manage SFTP servers.
    #[command(subcommand)]
    Servers(ServersCmd),
    /// Manage watched directories.
    #[command(subcommand)]
    Watches(WatchesCmd),
    /// Inspect files, their history, and requeue failures.
    #[command(subcommand)]
    Files(FilesCmd),
    /// Show agents and their health (`ferryctl agents` = `ferryctl agents list`).
    Agents(AgentsArgs),
    /// Print a shell completion script, e.g. `ferryctl completions bash >
    /// /etc/bash_completion.d/ferryctl` (offline).
    Completions {
        /// Shell to complete in.
        shell: clap_complete::Shell,
    },
    /// One screen about the whole system: files by status per server,
    /// announcement backlog, the oldest waiting file, agent load, failing polls.
    Status,
}

// ---------------------------------------------------------------- certs

#[derive(Debug, Subcommand)]
pub enum CertsCmd {
    /// Create a CA: DIR/ca.pem and DIR/ca-key.pem (mode 0600).
    Init {
        /// Directory for the CA files (created if missing).
        #[arg(long, env = "FERRY_CERTS_DIR")]
        dir: PathBuf,
        /// Common name of the CA certificate.
        #[arg(long, default_value = "ferry development CA")]
        common_name: String,
        /// Overwrite an existing CA (certificates it issued stop being trusted).
        #[arg(long)]
        force: bool,
    },
    /// Issue a certificate signed by DIR/ca.pem: DIR/<name>.pem and DIR/<name>-key.pem.
    #[command(subcommand)]
    Issue(IssueCmd),
}

#[derive(Debug, Subcommand)]
pub enum IssueCmd {
    /// Server certificate for a coordinator.
    Coordinator {
        #[command(flatten)]
        target: IssueTarget,
        /// DNS name or IP address the coordinator is reached by (repeatable).
        #[arg(long = "host", value_name = "HOST", default_values = ["localhost", "127.0.0.1"])]
        hosts: Vec<String>,
    },
    /// Client certificate for an agent of one site (SAN
    /// `spiffe://ferry/agent/<site>/<name>`): the agent gets that site's
    /// servers and no other's.
    Agent {
        #[command(flatten)]
        target: IssueTarget,
        /// Site whose servers the agent serves.
        #[arg(long, default_value = "default")]
        site: String,
    },
    /// Client certificate for an administrator (SAN `spiffe://ferry/admin/<name>`).
    Admin {
        #[command(flatten)]
        target: IssueTarget,
    },
}

/// Where a certificate is written and what it is called.
#[derive(Debug, Args)]
pub struct IssueTarget {
    /// Directory holding ca.pem and ca-key.pem; the new files are written there.
    #[arg(long, env = "FERRY_CERTS_DIR")]
    pub dir: PathBuf,
    /// Name of the certificate holder (letters, digits, '-', '_', '.'); also the file name.
    #[arg(long)]
    pub name: String,
    /// Overwrite existing DIR/<name>.pem and DIR/<name>-key.pem.
    #[arg(long)]
    pub force: bool,
}

// ---------------------------------------------------------------- servers

/// A server given by numeric id or by name (a purely numeric value is an id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerRef {
    Id(i64),
    Name(String),
}

impl FromStr for ServerRef {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.is_empty() {
            return Err("expected a server id or name".into());
        }
        Ok(match s.parse::<i64>() {
            Ok(id) if id > 0 => ServerRef::Id(id),
            Ok(_) => return Err(format!("{s:?} is not a valid server id")),
            Err(_) => ServerRef::Name(s.to_string()),
        })
    }
}

impl fmt::Display for ServerRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerRef::Id(id) => write!(f, "{id}"),
            ServerRef::Name(name) => f.write_str(name),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum ServersCmd {
    /// Register an SFTP server (pin its host key with --host-key or --trust-host-key).
    Add(ServerAddArgs),
    /// Change a server; options not given keep their value.
    Update(ServerUpdateArgs),
    /// Remove a server and its watches.
    Remove {
        /// Server id or name.
        server: ServerRef,
    },
    /// List servers with their poll health.
    List,
    /// Show one server, its health and its watches.
    Show {
        /// Server id or name.
        server: ServerRef,
    },
    /// Read an SFTP server's host key fingerprint through a connected agent of
    /// the server's site (nothing is pinned).
    Probe {
        /// SFTP host name or IP address, as the site's agents reach it.
        #[arg(long)]
        host: String,
        /// Site whose agent connects to the server.
        #[arg(long, default_value = "default")]
        site: String,
        /// SFTP port.
        #[arg(long, default_value_t = 22, value_parser = clap::value_parser!(u16).range(1..))]
        port: u16,
    },
}

const PASSWORD_FLAGS: [&str; 3] = ["password_env", "password_file", "password_stdin"];

/// SSH login secret: never a value on the command line, always a source.
#[derive(Debug, Args, Default)]
#[group(id = "credential", multiple = false)]
pub struct CredentialArgs {
    /// Read the SSH password from this environment variable.
    #[arg(long, value_name = "VAR")]
    pub password_env: Option<String>,
    /// Read the SSH password from this file (one trailing newline is dropped).
    #[arg(long, value_name = "FILE")]
    pub password_file: Option<PathBuf>,
    /// Read the SSH password from standard input (one trailing newline is dropped).
    #[arg(long)]
    pub password_stdin: bool,
    /// Log in with this private key file (OpenSSH or PKCS#8 PEM).
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
}

/// Passphrase of the private key given with `--key-file`. (`requires` alone
/// is not enough: clap waives it when a conflicting password flag is present.)
#[derive(Debug, Args, Default)]
#[group(id = "passphrase", multiple = false)]
pub struct PassphraseArgs {
    /// Read the private key's passphrase from this environment variable.
    #[arg(long, value_name = "VAR", requires = "key_file", conflicts_with_all = PASSWORD_FLAGS)]
    pub passphrase_env: Option<String>,
    /// Read the private key's passphrase from this file.
    #[arg(long, value_name = "FILE", requires = "key_file", conflicts_with_all = PASSWORD_FLAGS)]
    pub passphrase_file: Option<PathBuf>,
}

/// How the SSH host key gets pinned.
#[derive(Debug, Args, Default)]
#[group(id = "host_key_source", multiple = false)]
pub struct HostKeyArgs {
    /// Pin this host key fingerprint (`SHA256:...`, see `servers probe`).
    #[arg(long, value_name = "SHA256:...")]
    pub host_key: Option<String>,
    /// Connect now and pin whatever key the server presents (trust on first use).
    #[arg(long)]
    pub trust_host_key: bool,
}

#[derive(Debug, Args)]
pub struct ServerAddArgs {
    /// Unique server name (letters, digits, '-', '_', '.').
    pub name: String,
    /// SFTP host name or IP address.
    #[arg(long)]
    pub host: String,
    /// SFTP port.
    #[arg(long, default_value_t = 22, value_parser = clap::value_parser!(u16).range(1..))]
    pub port: u16,
    /// SSH user name.
    #[arg(long)]
    pub user: String,
    #[command(flatten)]
    pub credential: CredentialArgs,
    #[command(flatten)]
    pub passphrase: PassphraseArgs,
    #[command(flatten)]
    pub host_key: HostKeyArgs,
    /// Site label: only agents of this site poll the server (default: "default").
    #[arg(long)]
    pub site: Option<String>,
    /// Maximum concurrent SSH sessions to the server (default 4).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_sessions: Option<u32>,
    /// Register the server disabled (not polled until enabled).
    #[arg(long)]
    pub disabled: bool,
}

#[derive(Debug, Args)]
pub struct ServerUpdateArgs {
    /// Server id or name.
    pub server: ServerRef,
    /// New name.
    #[arg(long, value_name = "NAME")]
    pub rename: Option<String>,
    /// New SFTP host name or IP address.
    #[arg(long)]
    pub host: Option<String>,
    /// New SFTP port.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub port: Option<u16>,
    /// New SSH user name.
    #[arg(long)]
    pub user: Option<String>,
    #[command(flatten)]
    pub credential: CredentialArgs,
    #[command(flatten)]
    pub passphrase: PassphraseArgs,
    #[command(flatten)]
    pub host_key: HostKeyArgs,
    /// New site label.
    #[arg(long)]
    pub site: Option<String>,
    /// New maximum of concurrent SSH sessions.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_sessions: Option<u32>,
    /// Enable polling of the server.
    #[arg(long, conflicts_with = "disable")]
    pub enable: bool,
    /// Disable polling of the server.
    #[arg(long)]
    pub disable: bool,
}

// ---------------------------------------------------------------- watches

#[derive(Debug, Subcommand)]
pub enum WatchesCmd {
    /// Watch a directory of a server for new files.
    Add(WatchAddArgs),
    /// Change a watch; options not given keep their value.
    Update(WatchUpdateArgs),
    /// Remove a watch.
    Remove {
        /// Watch id.
        id: i64,
    },
    /// List watches.
    List {
        /// Only the watches of this server (id or name).
        #[arg(long)]
        server: Option<ServerRef>,
    },
}

#[derive(Debug, Args)]
pub struct WatchAddArgs {
    /// Server (id or name) the directory is on.
    #[arg(long)]
    pub server: ServerRef,
    /// Absolute remote directory. It must not overlap another watch of the
    /// server (same directory, or inside/around a recursive watch) unless the
    /// globs are disjoint (e.g. `*.csv` and `*.xml`).
    #[arg(long, value_name = "PATH")]
    pub dir: String,
    /// File name glob, e.g. `*.csv` (default `*`).
    #[arg(long)]
    pub glob: Option<String>,
    /// Also watch subdirectories.
    #[arg(long)]
    pub recursive: bool,
    /// Poll interval in seconds (default 30).
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u32).range(1..))]
    pub interval: Option<u32>,
    /// Minimum file age (now - mtime) in seconds before a stable file is taken.
    #[arg(long, value_name = "SECS")]
    pub min_age: Option<u32>,
    /// Destination bucket.
    #[arg(long)]
    pub bucket: String,
    /// Object key template; placeholders {server} {watch} {path} {dir} {name} {date}
    /// {version} (default `{server}/{dir}/{version}/{name}`). Must contain {version}
    /// (`<mtime>-<size>`, so a replaced file never overwrites the earlier object)
    /// and {path}, or {name} (plus {dir} on a recursive watch); these four each
    /// fill a whole `/`-separated segment.
    #[arg(long, value_name = "TEMPLATE")]
    pub key_template: Option<String>,
    /// After a confirmed upload: keep, delete or move:/absolute/dir (default keep).
    /// A move target must lie outside every watched tree of the server.
    #[arg(long, value_name = "ACTION", value_parser = parse_post_action)]
    pub post_action: Option<PostAction>,
    /// Create the watch disabled.
    #[arg(long)]
    pub disabled: bool,
    /// Start from now: files already in the directory at the first listing
    /// are recorded as `skipped` (not transferred, not announced; requeue
    /// them with `files retry ID...` or `files retry --status skipped`).
    /// Files that appear later flow normally.
    #[arg(long)]
    pub skip_existing: bool,
}

#[derive(Debug, Args)]
pub struct WatchUpdateArgs {
    /// Watch id.
    pub id: i64,
    /// New absolute remote directory.
    #[arg(long, value_name = "PATH")]
    pub dir: Option<String>,
    /// New file name glob.
    #[arg(long)]
    pub glob: Option<String>,
    /// Also watch subdirectories.
    #[arg(long, conflicts_with = "no_recursive")]
    pub recursive: bool,
    /// Watch the directory itself only.
    #[arg(long)]
    pub no_recursive: bool,
    /// New poll interval in seconds.
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u32).range(1..))]
    pub interval: Option<u32>,
    /// New minimum file age in seconds.
    #[arg(long, value_name = "SECS")]
    pub min_age: Option<u32>,
    /// New destination bucket.
    #[arg(long)]
    pub bucket: Option<String>,
    /// New object key template (same rules as `watches add --key-template`).
    #[arg(long, value_name = "TEMPLATE")]
    pub key_template: Option<String>,
    /// New post-action: keep, delete or move:/absolute/dir.
    #[arg(long, value_name = "ACTION", value_parser = parse_post_action)]
    pub post_action: Option<PostAction>,
    /// Enable the watch.
    #[arg(long, conflicts_with = "disable")]
    pub enable: bool,
    /// Disable the watch.
    #[arg(long)]
    pub disable: bool,
}

fn parse_post_action(s: &str) -> Result<PostAction, String> {
    s.parse()
}

// ---------------------------------------------------------------- files

#[derive(Debug, Subcommand)]
pub enum FilesCmd {
    /// List files, newest first (`--sort oldest` for discovery order).
    List(FilesListArgs),
    /// Show one file and its history.
    Show {
        /// File id.
        id: i64,
    },
    /// Requeue files in error, failed or lost (or the given ids, which may also
    /// be `skipped` baseline files; `--status skipped` takes them all); prints how many.
    /// Without --status it also re-arms the failed post-actions of the selected
    /// processed files (and offers their parked announcements again).
    Retry {
        /// File ids to requeue.
        ids: Vec<i64>,
        /// Only files in this status (repeatable or comma-separated).
        #[arg(long, value_name = "STATUS", value_parser = parse_status, value_delimiter = ',')]
        status: Vec<FileStatus>,
        /// Only files of this server (id or name).
        #[arg(long)]
        server: Option<ServerRef>,
        /// Print what would be requeued (count and file ids) and change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Follow live status changes, one line (or JSON object) per event, until
    /// Ctrl-C; every 2 s also the bytes done of running transfers that moved.
    /// A lost connection is reopened where it left off (no event skipped).
    Watch {
        /// Only files of this server (id or name).
        #[arg(long)]
        server: Option<ServerRef>,
        /// Only files of this watch.
        #[arg(long = "watch", value_name = "ID")]
        watch_id: Option<i64>,
        /// Show status changes only, no progress of running transfers.
        #[arg(long)]
        no_progress: bool,
    },
}

#[derive(Debug, Args)]
pub struct FilesListArgs {
    /// Only files in this status (repeatable or comma-separated): new, in_progress,
    /// uploaded, processed, error, failed, lost.
    #[arg(long, value_name = "STATUS", value_parser = parse_status, value_delimiter = ',')]
    pub status: Vec<FileStatus>,
    /// Only files of this server (id or name).
    #[arg(long)]
    pub server: Option<ServerRef>,
    /// Only files of this watch.
    #[arg(long = "watch", value_name = "ID")]
    pub watch_id: Option<i64>,
    /// Print at most this many files.
    #[arg(long, value_name = "N", default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
    pub limit: u32,
    /// Print every matching file (follows all pages; ignores --limit).
    #[arg(long)]
    pub all: bool,
    /// Order by discovery (file id): newest or oldest first.
    #[arg(long, value_enum, default_value_t = FileOrder::Newest)]
    pub sort: FileOrder,
}

/// Order of `files list`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FileOrder {
    Newest,
    Oldest,
}

fn parse_status(s: &str) -> Result<FileStatus, String> {
    s.parse()
}

// ---------------------------------------------------------------- agents

#[derive(Debug, Args)]
struct AgentsArgs {
    #[command(subcommand)]
    command: Option<AgentsCmd>,
}

#[derive(Debug, Subcommand)]
pub enum AgentsCmd {
    /// List agents: site, version, connection, drain, last heartbeat, load,
    /// transfer rate, polled servers.
    List,
    /// Drain an agent: it stops polling (other agents of its site take its
    /// servers), finishes running transfers and gets no new ones, but stays
    /// connected. Lasts until `--undo`, across reconnects.
    Drain {
        /// The agent: SITE/NAME, or a name only one site's agent has.
        name: String,
        /// The agent's site, when NAME is given without it.
        #[arg(long, default_value = "")]
        site: String,
        /// Lift the drain: the agent takes work again.
        #[arg(long)]
        undo: bool,
    },
    /// Revoke an agent (the site and name in its certificate): its
    /// certificate is refused from now on, its live stream is closed on every
    /// coordinator within a heartbeat, and its servers and transfers go to
    /// other agents. Works for agents that never connected, too (give the site).
    Revoke {
        /// The agent: SITE/NAME, or a name only one site's agent has.
        name: String,
        /// The agent's site, when NAME is given without it.
        #[arg(long, default_value = "")]
        site: String,
        /// Lift the revocation.
        #[arg(long)]
        undo: bool,
    },
}

// ---------------------------------------------------------------- dispatch

/// A mistake in how ferryctl was called that clap cannot see; exits with 2.
#[derive(Debug)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// The clap command with rules the derive cannot express: `servers add`
/// needs exactly one credential source, `servers update` at most one.
fn command() -> clap::Command {
    Cli::command().mut_subcommand("servers", |servers| {
        servers.mut_subcommand("add", |add| {
            add.mut_group("credential", |g| g.required(true))
        })
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    ferry_proto::tls::install_crypto_provider();
    let matches = command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(err) => err.exit(),
    };
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => report(&err),
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let json = cli.global.json;
    match cli.command {
        Command::Certs(cmd) => certs::run(&cmd, json),
        Command::Servers(cmd) => {
            let admin = Admin::connect(&cli.global).await?;
            commands::servers::run(&admin, cmd, json).await
        }
        Command::Watches(cmd) => {
            let admin = Admin::connect(&cli.global).await?;
            commands::watches::run(&admin, cmd, json).await
        }
        Command::Files(cmd) => {
            let admin = Admin::connect(&cli.global).await?;
            commands::files::run(&admin, cmd, json).await
        }
        Command::Completions { shell } => {
            completions(shell, &mut std::io::stdout().lock())?;
            Ok(())
        }
        Command::Status => {
            let admin = Admin::connect(&cli.global).await?;
            commands::status::run(&admin, json).await
        }
        Command::Agents(args) => {
            let admin = Admin::connect(&cli.global).await?;
            match args.command.unwrap_or(AgentsCmd::List) {
                AgentsCmd::List => commands::agents::list(&admin, json).await,
                AgentsCmd::Drain { name, site, undo } => {
                    let req = DrainAgentRequest { name, site, undo };
                    commands::agents::drain(&admin, req, json).await
                }
                AgentsCmd::Revoke { name, site, undo } => {
                    let req = RevokeAgentRequest { name, site, undo };
                    commands::agents::revoke(&admin, req, json).await
                }
            }
        }
    }
}

/// Writes the completion script of `shell` for the whole command line.
fn completions(shell: clap_complete::Shell, out: &mut dyn std::io::Write) -> std::io::Result<()> {
    // Into a buffer first: `generate` panics on write errors (`| head`).
    let mut buf = Vec::new();
    clap_complete::generate(shell, &mut command(), "ferryctl", &mut buf);
    out.write_all(&buf)
}

/// Prints an error as one line on stderr and picks the exit status.
fn report(err: &anyhow::Error) -> ExitCode {
    if let Some(io) = err.downcast_ref::<std::io::Error>()
        && io.kind() == std::io::ErrorKind::BrokenPipe
    {
        // The reader of our stdout went away (`| head`): not an error.
        return ExitCode::SUCCESS;
    }
    if let Some(usage) = err.downcast_ref::<UsageError>() {
        eprintln!("error: {usage}");
        return ExitCode::from(2);
    }
    if let Some(status) = err.downcast_ref::<tonic::Status>() {
        eprintln!("error: {}", status_line(status));
        return ExitCode::FAILURE;
    }
    eprintln!("error: {}", chain(err.chain()));
    ExitCode::FAILURE
}

/// An error and its causes joined with `: ` (like `{:#}`). Transport errors
/// often repeat their cause in their own text, so `: `-separated parts already
/// on the line are left out.
fn chain<'a>(causes: impl Iterator<Item = &'a (dyn std::error::Error + 'static)>) -> String {
    let mut line = String::new();
    for cause in causes {
        append_parts(&mut line, &cause.to_string());
    }
    line
}

fn append_parts(line: &mut String, text: &str) {
    for part in text.split(": ") {
        if part.is_empty() || line.contains(part) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(part);
    }
}

/// `message (Code)`, with the transport cause for calls that never reached the server.
fn status_line(status: &tonic::Status) -> String {
    let mut line = if status.message().is_empty() {
        status.code().description().to_string()
    } else {
        status.message().to_string()
    };
    let mut source = std::error::Error::source(status);
    while let Some(cause) = source {
        append_parts(&mut line, &cause.to_string());
        source = cause.source();
    }
    format!("{line} ({:?})", status.code())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        command().debug_assert();
    }

    #[test]
    fn server_refs_are_ids_when_numeric() {
        assert_eq!("42".parse::<ServerRef>().unwrap(), ServerRef::Id(42));
        assert_eq!(
            "sftp-1".parse::<ServerRef>().unwrap(),
            ServerRef::Name("sftp-1".into())
        );
        assert!("0".parse::<ServerRef>().is_err());
        assert!("".parse::<ServerRef>().is_err());
    }

    #[test]
    fn servers_add_requires_one_credential() {
        let base = [
            "ferryctl", "servers", "add", "s1", "--host", "h", "--user", "u",
        ];
        assert!(command().try_get_matches_from(base).is_err());
        let with_key = base.iter().copied().chain(["--key-file", "k"]);
        assert!(command().try_get_matches_from(with_key).is_ok());
        let two = base
            .iter()
            .copied()
            .chain(["--key-file", "k", "--password-env", "P"]);
        assert!(command().try_get_matches_from(two).is_err());
        let pass = base
            .iter()
            .copied()
            .chain(["--password-env", "P", "--passphrase-env", "Q"]);
        assert!(command().try_get_matches_from(pass).is_err());
        let key = base
            .iter()
            .copied()
            .chain(["--key-file", "k", "--passphrase-env", "Q"]);
        assert!(command().try_get_matches_from(key).is_ok());
        let update = ["ferryctl", "servers", "update", "s1", "--enable"];
        assert!(command().try_get_matches_from(update).is_ok());
    }

    #[test]
    fn completions_cover_the_subcommands() {
        let mut out = Vec::new();
        completions(clap_complete::Shell::Bash, &mut out).unwrap();
        let script = String::from_utf8(out).unwrap();
        assert!(script.contains("complete"), "{script}");
        for word in ["status", "servers", "retry", "--dry-run"] {
            assert!(script.contains(word), "bash completion lacks {word}");
        }
        let bad = command().try_get_matches_from(["ferryctl", "completions", "tcsh"]);
        assert!(bad.is_err());
    }

    #[test]
    fn error_lines_drop_repeated_causes() {
        let mut line = "h2 protocol error: error reading a body".to_string();
        append_parts(&mut line, "error reading a body: peer closed connection");
        assert_eq!(
            line,
            "h2 protocol error: error reading a body: peer closed connection"
        );
        let status = tonic::Status::invalid_argument("invalid hostname: \"bad host\"");
        assert_eq!(
            status_line(&status),
            "invalid hostname: \"bad host\" (InvalidArgument)"
        );
    }

    #[test]
    fn status_filters_accept_lists() {
        let m = command()
            .try_get_matches_from([
                "ferryctl",
                "files",
                "list",
                "--status",
                "error,failed",
                "--status",
                "lost",
            ])
            .unwrap();
        let cli = Cli::from_arg_matches(&m).unwrap();
        let Command::Files(FilesCmd::List(args)) = cli.command else {
            panic!("parsed into the wrong command");
        };
        assert_eq!(
            args.status,
            [FileStatus::Error, FileStatus::Failed, FileStatus::Lost]
        );
    }
}
