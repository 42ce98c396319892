//! A Postgres cluster owned by one test (`initdb` + `pg_ctl` on a free
//! loopback port in a temp dir), so it can be stopped, restarted and restored
//! from a dump without touching the shared server other tests use.
//!
//! Binaries come from `/usr/lib/postgresql/<newest>/bin`, else PATH. Postgres
//! refuses to run as root: as root the harness runs them as the `postgres`
//! user (`runuser`), which then owns the temp dir.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use sqlx::{Connection, Executor, PgConnection};

use crate::util::{LogDir, log_tail, stable_port};

/// The OS user the server runs as when the tests run as root.
const OS_USER: &str = "postgres";

/// A test-owned Postgres cluster; stopped (immediately) on drop.
#[derive(Debug)]
pub struct PgCluster {
    dir: LogDir,
    data: PathBuf,
    bin: PathBuf,
    port: u16,
    log: PathBuf,
    as_user: Option<&'static str>,
}

impl PgCluster {
    /// `initdb` + start; panics (with the server log) if either fails.
    pub async fn start() -> PgCluster {
        let cluster = Self::init();
        cluster.start_server().await;
        cluster
    }

    /// `initdb` only: the cluster has a port and URLs, but nothing listens
    /// until [`PgCluster::start_server`].
    pub fn init() -> PgCluster {
        Self::try_init().unwrap_or_else(|e| panic!("initdb a test Postgres cluster: {e:#}"))
    }

    fn try_init() -> anyhow::Result<PgCluster> {
        let dir = LogDir::new("pg-cluster")?;
        let as_user = running_as_root().then_some(OS_USER);
        if let Some(user) = as_user {
            run(Command::new("chown").arg(user).arg(dir.path()))?;
        }
        let cluster = PgCluster {
            data: dir.path().join("data"),
            log: dir.path().join("postgres.log"),
            bin: bin_dir(),
            // Bound again after every restart.
            port: stable_port(),
            as_user,
            dir,
        };
        let mut initdb = cluster.command("initdb");
        initdb.arg("-D").arg(&cluster.data).args([
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        ]);
        run(&mut initdb)?;
        Ok(cluster)
    }

    /// Starts the server (waits until it accepts connections).
    pub async fn start_server(&self) {
        let mut start = self.command("pg_ctl");
        start
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(&self.log)
            .arg("-o")
            .arg(format!(
                "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off \
                 -c full_page_writes=off -c max_connections=200",
                self.port,
                self.dir.path().display()
            ))
            .args(["-w", "-t", "60", "start"]);
        if let Err(e) = run(&mut start) {
            panic!(
                "start test Postgres on port {}: {e:#}\nlog {}:\n{}",
                self.port,
                self.log.display(),
                log_tail(&self.log, 30)
            );
        }
        crate::util::wait_for_port(self.addr(), Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
    }

    /// Stops the server (`-m fast`: clients are disconnected, no crash recovery).
    pub fn stop(&self) {
        let mut stop = self.command("pg_ctl");
        stop.arg("-D")
            .arg(&self.data)
            .args(["-m", "fast", "-w", "-t", "60", "stop"]);
        run(&mut stop).unwrap_or_else(|e| panic!("stop test Postgres: {e:#}"));
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `postgres://postgres@127.0.0.1:PORT/<database>`.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Creates `database` (the server must be running).
    pub async fn create_database(&self, database: &str) {
        let mut admin = PgConnection::connect(&self.url("postgres"))
            .await
            .unwrap_or_else(|e| panic!("connect to test Postgres: {e}"));
        admin
            .execute(format!("CREATE DATABASE \"{database}\"").as_str())
            .await
            .unwrap_or_else(|e| panic!("create database {database}: {e}"));
        let _ = admin.close().await;
    }

    /// `pg_dump -Fc` of `database` into the cluster's dir; returns the path.
    pub fn dump(&self, database: &str, name: &str) -> PathBuf {
        let path = self.dir.path().join(format!("{name}.dump"));
        let mut dump = self.command("pg_dump");
        dump.args(["-Fc", "-h", "127.0.0.1", "-U", "postgres", "-p"])
            .arg(self.port.to_string())
            .arg("-f")
            .arg(&path)
            .arg(database);
        run(&mut dump).unwrap_or_else(|e| panic!("pg_dump {database}: {e:#}"));
        path
    }

    /// Replaces `database` with the contents of `dump` (drops it, with every
    /// connection to it, creates it again and runs `pg_restore`).
    pub async fn restore(&self, database: &str, dump: &Path) {
        let mut admin = PgConnection::connect(&self.url("postgres"))
            .await
            .unwrap_or_else(|e| panic!("connect to test Postgres: {e}"));
        for sql in [
            format!("DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)"),
            format!("CREATE DATABASE \"{database}\""),
        ] {
            admin
                .execute(sql.as_str())
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
        }
        let _ = admin.close().await;
        let mut restore = self.command("pg_restore");
        restore
            .args(["-h", "127.0.0.1", "-U", "postgres", "-p"])
            .arg(self.port.to_string())
            .args(["--exit-on-error", "-d", database])
            .arg(dump);
        run(&mut restore).unwrap_or_else(|e| panic!("pg_restore {database}: {e:#}"));
    }

    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }

    /// `name` from the cluster's bin dir, as the server's OS user.
    fn command(&self, name: &str) -> Command {
        let program = self.bin.join(name);
        match self.as_user {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(program);
                c
            }
            None => Command::new(program),
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let mut stop = self.command("pg_ctl");
        stop.arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "-t", "30", "stop"]);
        // Not running (never started, already stopped) is fine.
        let _ = stop.output();
    }
}

/// Runs `command`, failing with its output when it does not succeed.
fn run(command: &mut Command) -> anyhow::Result<()> {
    let out = command
        .output()
        .with_context(|| format!("run {command:?}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{command:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// The newest `/usr/lib/postgresql/<version>/bin` holding `pg_ctl`; else
/// the directory of `pg_ctl` on PATH (empty: run by name).
fn bin_dir() -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("pg_ctl").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).unwrap_or_default()
}
