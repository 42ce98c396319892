//! The real `ferry-coordinator` binary, started on a loopback port with a test
//! database and test PKI; it can be killed, SIGTERMed and restarted on the
//! same port. Its stderr goes to a log file whose tail is shown on failure.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::Context;
use ferry_proto::admin_service_client::AdminServiceClient;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{ChildStdout, Command};
use tonic::transport::Channel;

use crate::certs::{CertFiles, TestPki};
use crate::ctl::Ctl;
use crate::postgres::TestDb;
use crate::util::{ChildGuard, LogDir, bin_path, log_tail};

/// The line prefix the coordinator prints on stdout once it accepts connections.
const READY_PREFIX: &str = "ferry-coordinator listening on ";
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A running (or deliberately stopped) coordinator process.
#[derive(Debug)]
pub struct Coordinator {
    dir: LogDir,
    /// Environment for every (re)start, except `FERRY_LISTEN`.
    env: Vec<(String, String)>,
    child: Option<ChildGuard>,
    addr: SocketAddr,
    stderr_log: PathBuf,
    stdout_log: PathBuf,
}

impl Coordinator {
    /// Starts `ferry-coordinator serve` on 127.0.0.1:0 and waits until it
    /// reports its address. Panics (with the log tail) if it does not.
    pub async fn start(db: &TestDb, pki: &TestPki) -> Self {
        Self::start_with_env(db, pki, &[]).await
    }

    /// Like [`Coordinator::start`] with extra environment variables
    /// (they override the defaults, e.g. `RUST_LOG`).
    pub async fn start_with_env(db: &TestDb, pki: &TestPki, extra: &[(&str, &str)]) -> Self {
        ferry_proto::tls::install_crypto_provider();
        let dir = LogDir::new("coordinator").unwrap_or_else(|e| panic!("{e:#}"));
        let certs = pki.coordinator();
        let mut env: Vec<(String, String)> = [
            ("FERRY_DATABASE_URL", db.url()),
            ("FERRY_TLS_CA", &path_str(&certs.ca)),
            ("FERRY_TLS_CERT", &path_str(&certs.cert)),
            ("FERRY_TLS_KEY", &path_str(&certs.key)),
            ("FERRY_SECRET_KEY_FILE", &path_str(pki.secret_key_file())),
            ("RUST_LOG", "info"),
            // Tests that stop a coordinator gracefully need no balancer to
            // notice first; the drain test sets its own delay.
            ("FERRY_DRAIN_DELAY_SECS", "0"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for (key, value) in extra {
            env.retain(|(k, _)| k != key);
            env.push((key.to_string(), value.to_string()));
        }
        let stderr_log = dir.path().join("coordinator.stderr.log");
        let stdout_log = dir.path().join("coordinator.stdout.log");
        let mut coordinator = Self {
            dir,
            env,
            child: None,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            stderr_log,
            stdout_log,
        };
        coordinator
            .spawn("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
        coordinator
    }

    /// Like [`Coordinator::start`] with the server certificate and client CA
    /// taken from `certs` (e.g. an operator's own PKI).
    pub async fn start_with_certs(db: &TestDb, pki: &TestPki, certs: &CertFiles) -> Self {
        let (ca, cert, key) = (
            path_str(&certs.ca),
            path_str(&certs.cert),
            path_str(&certs.key),
        );
        Self::start_with_env(
            db,
            pki,
            &[
                ("FERRY_TLS_CA", &ca),
                ("FERRY_TLS_CERT", &cert),
                ("FERRY_TLS_KEY", &key),
            ],
        )
        .await
    }

    /// `https://127.0.0.1:PORT` (the certificate has a 127.0.0.1 IP SAN).
    pub fn endpoint(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The address it listens on (kept across restarts).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Whether the process is running (not killed, not exited).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_status().is_none())
    }

    /// SIGKILLs the process and waits for it to go away.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await;
        }
    }

    /// Sends SIGTERM (graceful drain); see [`Coordinator::wait_exit`].
    pub fn terminate(&self) {
        let child = self.child.as_ref().expect("coordinator is not running");
        child.terminate().unwrap_or_else(|e| panic!("{e:#}"));
    }

    /// Waits up to `timeout` for the process to exit; `None` if still running.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut().expect("coordinator is not running");
        let status = child
            .wait_timeout(timeout)
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
        if status.is_some() {
            self.child = None;
        }
        status
    }

    /// Kills the process if it is running and starts it again on the same port.
    pub async fn restart(&mut self) {
        self.kill().await;
        let listen = self.addr.to_string();
        // The port can be briefly unavailable right after the kill: retry.
        let mut last_err = None;
        for _ in 0..5 {
            match self.spawn(&listen).await {
                Ok(()) => return,
                Err(e) => {
                    last_err = Some(e);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        panic!(
            "restart coordinator: {:#}",
            last_err.expect("at least one attempt")
        );
    }

    /// An admin gRPC client presenting `certs`.
    pub async fn admin_client(
        &self,
        certs: &CertFiles,
    ) -> anyhow::Result<AdminServiceClient<Channel>> {
        Ok(AdminServiceClient::new(self.channel(certs).await?))
    }

    /// An mTLS channel to the coordinator presenting `certs`.
    pub async fn channel(&self, certs: &CertFiles) -> anyhow::Result<Channel> {
        mtls_channel(&self.endpoint(), certs, "coordinator").await
    }

    /// `ferryctl` pointed at this coordinator, presenting `certs`.
    pub fn ctl(&self, certs: &CertFiles) -> Ctl {
        Ctl::new(self.endpoint(), certs)
    }

    /// The environment every (re)start uses, except `FERRY_LISTEN`.
    pub fn env(&self) -> &[(String, String)] {
        &self.env
    }

    /// The coordinator's stderr (its logs), appended across restarts.
    pub fn log_path(&self) -> &Path {
        &self.stderr_log
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.stderr_log, lines)
    }

    /// The temp dir with the logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    async fn spawn(&mut self, listen: &str) -> anyhow::Result<()> {
        let bin = bin_path("ferry-coordinator");
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.stderr_log)
            .with_context(|| format!("open {}", self.stderr_log.display()))?;
        let mut child = Command::new(&bin)
            .arg("serve")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("FERRY_LISTEN", listen)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawn {}", bin.display()))?;
        let stdout = child.stdout.take().context("coordinator stdout")?;
        let mut guard = ChildGuard::new(child, "ferry-coordinator");

        let ready =
            tokio::time::timeout(READY_TIMEOUT, read_until_ready(stdout, &self.stdout_log)).await;
        let failure = match ready {
            Ok(Ok(addr)) => {
                self.addr = addr;
                self.child = Some(guard);
                return Ok(());
            }
            Ok(Err(e)) => format!("{e:#}"),
            Err(_) => format!("no `{READY_PREFIX}...` line within {READY_TIMEOUT:?}"),
        };
        guard.kill().await;
        anyhow::bail!(
            "ferry-coordinator (FERRY_LISTEN={listen}) did not become ready: {failure}\n\
             stderr log {}:\n{}\nstdout log {}:\n{}",
            self.stderr_log.display(),
            log_tail(&self.stderr_log, 40),
            self.stdout_log.display(),
            log_tail(&self.stdout_log, 10)
        )
    }
}

/// Reads stdout lines (copying them to `log`) until the ready line, then keeps
/// copying the rest in a background task so the pipe never fills up.
async fn read_until_ready(stdout: ChildStdout, log: &Path) -> anyhow::Result<SocketAddr> {
    let mut out = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .await
        .with_context(|| format!("open {}", log.display()))?;
    let mut lines = BufReader::new(stdout).lines();
    loop {
        let Some(line) = lines.next_line().await.context("read coordinator stdout")? else {
            anyhow::bail!("process closed stdout (exited?) before printing `{READY_PREFIX}...`");
        };
        let _ = out.write_all(format!("{line}\n").as_bytes()).await;
        if let Some(rest) = line.trim().strip_prefix(READY_PREFIX) {
            let addr: SocketAddr = rest
                .trim()
                .parse()
                .with_context(|| format!("parse address in ready line {line:?}"))?;
            tokio::spawn(async move {
                while let Ok(Some(line)) = lines.next_line().await {
                    let _ = out.write_all(format!("{line}\n").as_bytes()).await;
                }
            });
            return Ok(addr);
        }
    }
}

fn path_str(path: &Path) -> String {
    path.to_str()
        .unwrap_or_else(|| panic!("path {} is not UTF-8", path.display()))
        .to_string()
}

/// An mTLS channel to `endpoint` (`https://127.0.0.1:port`, the coordinator
/// itself or a balancer in front of it, named `what` in errors) presenting
/// `certs`.
pub(crate) async fn mtls_channel(
    endpoint: &str,
    certs: &CertFiles,
    what: &str,
) -> anyhow::Result<Channel> {
    ferry_proto::tls::install_crypto_provider();
    let tls = certs
        .tls_paths()
        .load()
        .context("load client TLS files")?
        .client_config("127.0.0.1");
    Channel::from_shared(endpoint.to_string())
        .with_context(|| format!("{what} endpoint URI"))?
        .connect_timeout(Duration::from_secs(10))
        .tls_config(tls)
        .context("client TLS config")?
        .connect()
        .await
        .with_context(|| format!("connect to {what} at {endpoint}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ready_line_yields_address_and_rest_is_logged() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("stdout.log");
        let mut child = Command::new("sh")
            .args([
                "-c",
                "echo starting; echo 'ferry-coordinator listening on 127.0.0.1:4321'; echo after",
            ])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let addr = read_until_ready(stdout, &log).await.unwrap();
        assert_eq!(addr, "127.0.0.1:4321".parse().unwrap());
        child.wait().await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let logged = std::fs::read_to_string(&log).unwrap();
        assert!(
            logged.starts_with("starting\n") && logged.ends_with("after\n"),
            "{logged:?}"
        );
    }

    #[tokio::test]
    async fn exit_before_ready_line_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new("sh")
            .args(["-c", "echo oops"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let err = read_until_ready(stdout, &dir.path().join("log"))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("closed stdout"), "{err:#}");
    }
}
